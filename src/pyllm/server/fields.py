"""What a request's fields ask of the engine, for both completion endpoints: sampling (logit_bias
included), the output limit, and the fields this server does not implement, refused by name.

The rule: a field that changes the output is honoured, or refused with a 400 whose ``param`` names
it. A field that changes nothing here is accepted: OpenAI's bookkeeping (``user``, ``metadata``,
``store``, ``service_tier`` ...), llama-server's transport and slot knobs, a sampler's parameter whose
sampler is off (``mirostat_tau`` without ``mirostat``), and any refused field sent with its neutral
value (``mirostat: 0``, ``typical_p: 1``, ``min_keep: 1``): clients that send every field with
its default keep working. Names and forms are OpenAI's and llama-server's (``params_from_json`` in
``tools/server/server-schema.cpp`` and ``server-common.cpp`` at the pin).

The same table serves llama-server's native ``/completion`` (pyllm.server.native), which honours three of
its entries (``n_probs``, ``return_tokens``, ``response_fields``: ``refuse_unsupported(honoured=...)``), and
the Responses API (pyllm.server.responses), whose requests become chat requests. ``verbose`` is honoured
everywhere (``__verbose`` in the response) and ``reasoning_format`` takes ``none`` (the reasoning stays in
``content``) besides ``auto``/``deepseek``. Tool calls and constrained output (``tools``, ``tool_choice``,
``parallel_tool_calls``, ``response_format``, ``json_schema``, ``grammar``) are read by
pyllm.server.constraints, and ``n`` by ``Serving.check_n``.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

from pyllm.errors import ConfigError
from pyllm.sampling import SamplingParams

UNLIMITED = -1   # n_predict -1: as many tokens as the request may hold (llama-server's "infinity")


class FieldError(Exception):
    """A request field this server refuses or cannot read; answered as a 400 naming ``param``."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def _same(v: Any, n: Any) -> bool:
    if isinstance(v, bool) or isinstance(n, bool):
        return v is n   # true is not 1 here
    return v == n       # 0 == 0.0


def _off(*neutral: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or any(_same(v, n) for n in neutral)


def _at_most(limit: float) -> Callable[[Any], bool]:
    return lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v <= limit)


def _empty(v: Any) -> bool:
    return v is None or v == "" or v == [] or v == {}


def _no_forced_tool(v: Any) -> bool:
    return v is None or v in ("auto", "none")


_TOOL_CALLS = "use tools and tool_choice (function_call is the deprecated form)"

# name -> (is the value neutral?, why it is refused otherwise)
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    # llama-server's samplers that are not in pyllm's chain
    "mirostat": (_off(0, False), "Mirostat sampling is not implemented"),
    "dry_multiplier": (_off(0, 0.0), "DRY sampling is not implemented"),
    "xtc_probability": (_off(0, 0.0), "XTC sampling is not implemented"),
    "top_n_sigma": (_at_most(0), "top-n-sigma sampling is not implemented"),
    "dynatemp_range": (_at_most(0), "dynamic temperature is not implemented"),
    "samplers": (_off(), "the sampler order is fixed: logit_bias, repeat_penalty, top_k, typical_p, top_p, "
                         "min_p, temperature"),
    "min_keep": (_off(0, 1), "min_keep is fixed at 1"),
    "lora": (_empty, "LoRA adapters are not supported"),
    "backend_sampling": (_off(False), "backend sampling is not supported"),
    # llama-server's generation limits and response shapes that are not implemented
    "n_indent": (_off(0), "n_indent is not implemented"),
    "t_max_predict_ms": (_at_most(0), "t_max_predict_ms is not implemented"),
    "n_cache_reuse": (_off(0), "KV shifting (n_cache_reuse) is not implemented; a common prefix is reused"),
    "n_probs": (_off(0), "use logprobs (OpenAI's form) here; llama-server's /completion takes n_probs"),
    "post_sampling_probs": (_off(False), "logprobs are the model's, before sampling"),
    "n_cmpl": (_off(1), "one completion per request (n=1)"),
    "response_fields": (_empty, "the response has OpenAI's fields (llama-server's /completion takes it)"),
    "return_tokens": (_off(False), "the response has OpenAI's fields (logprobs carry the tokens; llama-server's "
                                   "/completion takes return_tokens)"),
    "return_progress": (_off(False), "prompt progress events are not sent"),
    "timings_per_token": (_off(False), "timings are not reported"),
    # reasoning and chat parsing beyond what this server does (split <think> into reasoning_content)
    "reasoning_format": (_off("auto", "deepseek", "none"), "reasoning is split into reasoning_content ('deepseek', "
                                                           "'auto') or left in content ('none')"),
    "reasoning_budget_tokens": (_off(-1), "a reasoning budget is not implemented"),
    "thinking_budget_tokens": (_off(-1), "a reasoning budget is not implemented"),
    "reasoning_control": (_off(False), "a reasoning budget is not implemented"),
    "parse_tool_calls": (_off(False), "tool calls are parsed whenever tools are given (llama-server's internal field)"),
    "chat_format": (lambda v: v is None, "the chat format is the server's"),
    "chat_parser": (lambda v: v is None, "the chat parser is the server's"),
    "generation_prompt": (lambda v: v is None, "the generation prompt comes from the chat template"),
    "continue_final_message": (_off(False, "none"), "continuing the final message is not implemented"),
    "add_generation_prompt": (_off(True), "the generation prompt is always added"),
    # OpenAI's
    "best_of": (_off(1), "one completion per request (best_of=1)"),
    "prediction": (lambda v: v is None, "predicted outputs are not implemented"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], "text is the only output modality"),
    "functions": (_empty, "use tools (functions are the deprecated form)"),
    "function_call": (_no_forced_tool, _TOOL_CALLS),
    "verbosity": (_off("medium"), "verbosity is not implemented"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
}


def refuse_unsupported(body, *, also: dict[str, str] = {}, honoured: frozenset = frozenset()) -> None:  # noqa: B006
    """Raise FieldError for the first field of ``body`` that would change the output but is not
    implemented (``REFUSED``, and ``also``: name -> why, refused whenever present). ``honoured``: names of
    ``REFUSED`` that this endpoint implements (llama-server's /completion honours ``n_probs``...)."""
    for name, (neutral, why) in REFUSED.items():
        if name in honoured:
            continue
        value = getattr(body, name, None)
        if not neutral(value):
            raise FieldError(f"{name}={_shown(value)} is not supported by this server: {why}", name)
    for name, why in also.items():
        value = getattr(body, name, None)
        if value is not None:
            raise FieldError(f"{name}={_shown(value)} is not supported here: {why}", name)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def max_tokens_of(body) -> Optional[int]:
    """The request's one output limit, or None for the server's default. ``max_tokens``,
    ``max_completion_tokens`` (OpenAI's newer name) and ``n_predict`` (llama-server's; -1: no limit,
    0: only decode the prompt) are aliases on both endpoints; two that disagree are refused."""
    given = [(n, getattr(body, n, None)) for n in ("max_tokens", "max_completion_tokens", "n_predict")]
    given = [(n, v) for n, v in given if v is not None]
    if not given:
        return None
    first, value = given[0]
    for name, other in given[1:]:
        if other != value:
            raise FieldError(f"{first}={value} and {name}={other} disagree; they are one limit (aliases): "
                             f"send one, or the same value", name)
    return UNLIMITED if value == -1 else value


def sampling_of(body, model, defaults: Optional[dict] = None) -> SamplingParams:
    """The request's SamplingParams: its fields, else the server's ``defaults`` (``--temp``), else
    llama.cpp's defaults."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value not in (None, 0, 0.0):
            raise FieldError(f"{name}={value!r} is not supported; use repeat_penalty (llama.cpp's) instead", name)
    kw = dict(defaults or {})
    kw.update({f: getattr(body, f) for f in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
                                        "typical_p", "seed")
          if getattr(body, f, None) is not None})
    if kw.get("seed") == -1:  # llama-server's "random"
        del kw["seed"]
    if body.logit_bias is not None:
        kw["logit_bias"] = logit_bias_of(body.logit_bias, model)
    try:
        return SamplingParams(**kw)
    except ConfigError as exc:
        field = str(exc).split("=", 1)[0]
        raise FieldError(str(exc), field if field in kw else "") from None


_INT_KEY = re.compile(r"\s*[+-]?\d+")   # what llama-server's strtol reads whole as a token id


def logit_bias_of(value: Any, model) -> list[tuple[int, float]]:
    """OpenAI's ``{"token id": bias}`` map and llama-server's forms: keys or pair heads that are text
    (each of its tokens gets the bias), ``[[token, bias], ...]`` pairs, and ``false`` as the bias
    (the token is never sampled). Anything llama-server would skip silently is refused here."""
    n_vocab = model.n_vocab

    def bias_of(where: str, b: Any) -> float:
        if b is False:
            return -math.inf
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
            raise FieldError(f"logit_bias{where}: the bias {_shown(b)} is not a finite number (or false, to ban "
                             "the token)", "logit_bias")
        return float(b)

    def tokens_of(where: str, key: Any) -> list[int]:
        if isinstance(key, str) and _INT_KEY.fullmatch(key):
            key = int(key)
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < n_vocab:
                raise FieldError(f"logit_bias{where}: token {key} is outside the vocabulary; expected 0 <= id < "
                                 f"{n_vocab}", "logit_bias")
            return [key]
        if isinstance(key, str) and key:
            return model.tokenize(key, add_special=False, parse_special=False)
        raise FieldError(f"logit_bias{where}: {_shown(key)} is neither a token id nor text", "logit_bias")

    out: list[tuple[int, float]] = []
    if isinstance(value, dict):
        for key, b in value.items():
            where = f"[{key!r}]"
            bias = bias_of(where, b)
            out.extend((t, bias) for t in tokens_of(where, key))
    elif isinstance(value, list):
        for i, pair in enumerate(value):
            where = f"[{i}]"
            if not isinstance(pair, list) or len(pair) != 2:
                raise FieldError(f"logit_bias{where}: expected a [token, bias] pair, got {_shown(pair)}", "logit_bias")
            bias = bias_of(where, pair[1])
            out.extend((t, bias) for t in tokens_of(where, pair[0]))
    else:
        raise FieldError(f"logit_bias: expected an object {{token: bias}} or a list of [token, bias] pairs, got "
                         f"{_shown(value)}", "logit_bias")
    return out
