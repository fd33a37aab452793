"""Request bodies of the OpenAI-compatible endpoints, validated strictly by pydantic.

Strict mode: a number where a string is expected (or "5" where an integer is) is a 400 naming
the field, never a silent coercion. The completion bodies keep the fields they do not declare
(``model_extra``): ``pyllm.server.fields`` refuses those that would change the output and are not
implemented (``mirostat``, ``grammar``, ``best_of`` ...), and the rest (``user``, ``metadata``,
``store`` ...) change nothing here.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

ROLES = ("system", "developer", "user", "assistant", "tool")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: Optional[str] = None


class Message(BaseModel):
    # Extra keys (tool_calls, tool_call_id, name, reasoning_content) go to the chat template as given.
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal[ROLES]  # type: ignore[valid-type]
    content: Union[str, list[ContentPart], None] = None


class _Sampling(_Body):
    model_config = ConfigDict(extra="allow", strict=True)

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)   # OpenAI's newer name; llama-server takes it too
    n_predict: Optional[int] = Field(None, ge=-1)               # llama-server's: -1 no limit, 0 the prompt only
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repeat_penalty: Optional[float] = None          # llama-server's extension
    repeat_last_n: Optional[int] = None             # llama-server's extension
    typical_p: Optional[float] = None               # llama-server's extension
    logit_bias: Any = None                          # read by pyllm.server.fields.logit_bias_of
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[Union[bool, int]] = None
    top_logprobs: Optional[int] = None
    ignore_eos: Optional[bool] = False              # llama-server's extension
    cache_prompt: Optional[bool] = None             # llama-server's extension (None: the server's setting)
    verbose: Optional[bool] = None                  # llama-server's: '__verbose' (the native result) in the response


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    response_format: Optional[dict[str, Any]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None   # llama-server's extension (e.g. enable_thinking)
    reasoning_effort: Optional[str] = None          # to the template, as llama-server passes it ("none": no thinking)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: Optional[bool] = False
    suffix: Optional[str] = None


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


class NativeCompletionRequest(_Sampling):
    """llama-server's /completion: ``prompt`` in any of its forms (read by pyllm.server.native.prompt_list)."""

    prompt: Any
    n_probs: Optional[int] = None                   # top alternatives per token (completion_probabilities)
    return_tokens: Optional[bool] = None            # the generated token ids in ``tokens``
    response_fields: Optional[list[str]] = None     # only these fields ("a/b" = a nested field)


class ApplyTemplateRequest(_Body):
    """llama-server's /apply-template and /chat/completions/input_tokens: a conversation to render."""

    model_config = ConfigDict(extra="allow", strict=True)

    messages: list[Message]
    tools: Optional[list[dict[str, Any]]] = None
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[str] = None
