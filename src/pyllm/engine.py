"""The single-sequence engine: the engine core (``pyllm.core``) with one slot, run on the caller's thread.

``Engine`` is the simplest use of the one decode loop that ``BatchedEngine`` runs on its thread: the
same scheduler, KV/prefix cache, sampling and output step, with ``n_parallel = 1``; each ``stream()``
steps the core from the caller's thread, so Ctrl-C there ends the reply within one step
(``interrupted``) and leaves the engine usable.
"""
from __future__ import annotations

import threading
from typing import Generator, Iterator, Optional, Sequence, Union

from pyllm import chat as chat_mod
from pyllm.chat import ChatResult
from pyllm.config import CHAT_MAX_TOKENS, EngineConfig
from pyllm.context import KVCacheBytes
from pyllm.core import EngineCore
from pyllm.errors import ClosedError, ConfigError
from pyllm.loading import gpu_layers_for, gpu_layers_of, load_model, model_path_of, placement_of
from pyllm.model import Model
from pyllm.sampling import SamplingParams
from pyllm.sequence import GREEDY, GenerationResult, Request, StopReason, check_fits

__all__ = ["GREEDY", "Engine", "GenerationResult", "StopReason", "Stream", "check_fits", "gpu_layers_for",
           "gpu_layers_of", "load_model", "model_path_of", "placement_of"]


class Engine:
    """Loads the configured model and creates its context; generates text, one sequence at a time.

    ``Engine()`` reads the environment (``EngineConfig.from_env()``); without MODEL_PATH it
    uses the default model. Close it (or use ``with``) to free native memory. The prompt of the
    previous generation stays cached: a prompt that starts with it decodes only the rest.
    """

    def __init__(self, config: Optional[EngineConfig] = None, *, model: Optional[Model] = None) -> None:
        """``model``: an already loaded model to share (the engine then closes only its context)."""
        self.config = config = config if config is not None else EngineConfig.from_env()
        self._owns_model = model is None
        self.model = model = model if model is not None else load_model(config)
        try:
            self._core = EngineCore(model, config, n_parallel=1, kv_unified=True, lock=threading.Condition(),
                                    sigint_reason="interrupted")
        except BaseException:
            if self._owns_model:
                self.model.close()
            raise
        self.context = self._core.context
        self.last_result: Optional[GenerationResult] = None
        self._closed = False

    # ---- lifetime ----
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._core.cancel_all()
        self._core.close()
        if self._owns_model:
            self.model.close()

    def reset(self) -> None:
        """Empty the KV cache: the next generation starts from nothing."""
        self._check_open()
        self._core.kv.evict_idle()
        self._core.refresh_snapshot()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this Engine is closed")

    # ---- reporting ----
    def kv_cache_bytes(self) -> KVCacheBytes:
        return self.context.kv_cache_bytes()

    @property
    def n_ctx(self) -> int:
        return self.context.n_ctx

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens whose K/V the cache holds, in order (the previous prompt and reply, as decoded)."""
        return list(self._core.kv.slots[0].cached)

    def stats(self) -> dict:
        """Counters, KV occupancy and the step trace's sums, as ``BatchedEngine.stats()``."""
        return self._core.stats_snapshot()

    def step_trace(self, n: int = 0):
        """The last ``n`` steps of the decode loop (``pyllm.trace.StepRecord``), oldest first."""
        return self._core.trace.recent(n)

    # ---- prompts ----
    def format_chat(self, prompt: str) -> str:
        return self.model.apply_chat_template([{"role": "user", "content": prompt}], template=self.config.chat_template)

    def tokenize_chat_text(self, text: str) -> list[int]:
        """Tokenize a rendered chat prompt: its control tokens parsed as such, and no second BOS when
        the template already wrote the BOS token's text at the start."""
        tokens = self.model.tokenize_chat(text)
        if not tokens:
            raise ConfigError("the chat template rendered an empty prompt; expected at least one token")
        return tokens

    def tokenize_prompt(self, prompt: Union[str, Sequence[int]], *, chat: bool = False) -> list[int]:
        if isinstance(prompt, (list, tuple)) and not chat:
            if not prompt:
                raise ConfigError("prompt is an empty token list; expected at least one token")
            self.model.check_tokens(prompt)
            return list(prompt)
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if chat:
            prompt_obj, _ = self.chat_prompt([{"role": "user", "content": prompt}], enable_thinking=None)
            if not prompt_obj.tokens:
                raise ConfigError("the chat template rendered an empty prompt; expected at least one token")
            return prompt_obj.tokens
        if prompt == "":
            raise ConfigError("prompt is empty; expected at least one character")
        return self.model.tokenize_prompt(prompt)

    def ingest(self, tokens: list[int]) -> int:
        """Put the prompt in the cache, reusing the longest cached prefix; returns tokens decoded (the
        last prompt token always is: its logits give the first token)."""
        self._check_open()
        req = self._core.make_request(tokens, max_tokens=0, sampling=GREEDY, stop=(), ignore_eos=False,
                                      parse_special=False, logprobs=None, cache_prompt=True)
        for _ in self._drive(req):
            pass
        result = req.result
        if result.stop_reason != StopReason.MAX_TOKENS:
            if result.error is not None:
                raise result.error
            raise ConfigError(f"the prompt was not decoded: {result.stop_reason}")
        return result.n_prompt_decoded

    # ---- generation ----
    def stream(
        self,
        prompt: Union[str, Sequence[int]],
        *,
        max_tokens: Optional[int] = 128,
        sampling: SamplingParams = GREEDY,
        stop: Sequence[str] = (),
        chat: bool = False,
        ignore_eos: bool = False,
    ) -> "Stream":
        """The completion as a :class:`Stream`: iterate it for text pieces (whole UTF-8 characters),
        then read its ``.result`` (a GenerationResult).

        ``prompt``: text, or a list of token ids. ``max_tokens=None`` generates until an
        end-of-generation token or a full context; ``ignore_eos``: end-of-generation tokens are never
        sampled (a -inf logit bias on each, as llama.cpp's --ignore-eos; benchmarks use it to run exactly
        max_tokens steps).
        Sampling without its own seed uses the engine's (``EngineConfig.seed``, ``LLAMA_SEED``).
        Raises ConfigError (bad arguments), ContextFullError (prompt + max_tokens beyond n_ctx), ClosedError.
        """
        self._check_open()
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0):
            raise ConfigError(f"max_tokens={max_tokens!r} is out of range; expected an integer >= 0 or None")
        if isinstance(stop, str):
            stop = (stop,)
        prompt_tokens = self.tokenize_prompt(prompt, chat=chat)
        req = self._core.make_request(prompt_tokens, max_tokens=max_tokens, sampling=sampling, stop=stop,
                                      ignore_eos=ignore_eos, parse_special=False, logprobs=None, cache_prompt=True)
        return Stream(self._drive(req), req)

    def _drive(self, req: Request) -> Generator[str, None, GenerationResult]:
        """Step the core on this thread until ``req`` is done, yielding its text pieces."""
        core = self._core
        self.last_result = None
        core.enqueue(req, None)
        i = 0
        try:
            while True:
                pieces = req._pieces   # appended by this very thread (core.step), read between steps
                while i < len(pieces):
                    i += 1
                    yield pieces[i - 1]
                if req.done:
                    break
                core.step()
        except KeyboardInterrupt:
            # Ctrl-C: the decode it hit was aborted (or it landed between two): the reply ends as
            # 'interrupted', its cells are freed, the engine stays usable; the exception goes on.
            core.interrupt("interrupted")
            self._end(req, "interrupted")
            raise
        except GeneratorExit:
            # The consumer closed the stream: what was decoded stays cached for the next prompt.
            self._end(req, "cancelled")
            raise
        except BaseException:
            self._end(req, "error")
            raise
        finally:
            self.last_result = req.result
        return req.result

    def _end(self, req: Request, reason: str) -> None:
        core = self._core
        if req.done:
            return
        if req in core.active:
            core.finish(req, reason, free=reason != "cancelled")
        else:
            with core.lock:
                if req in core.queue:
                    core.queue.remove(req)
            core.finish_unadmitted(req, reason)

    # ---- chat ----
    def render_chat(self, messages: Sequence[dict], *, template: Optional[str] = None,
                    enable_thinking: Optional[bool] = None, tools: Optional[list] = None,
                    **template_kwargs) -> tuple[str, "chat_mod.ChatTemplate"]:
        """The prompt text for ``messages`` and the template that rendered it (``template``: as for
        Model.apply_chat_template; default the config's chat_template, else the model's own)."""
        prompt, tmpl = self.chat_prompt(messages, template=template, enable_thinking=enable_thinking, tools=tools,
                                        **template_kwargs)
        return prompt.text, tmpl

    def chat_prompt(self, messages: Sequence[dict], *, template: Optional[str] = None,
                    enable_thinking: Optional[bool] = None, tools: Optional[list] = None,
                    **template_kwargs) -> tuple["chat_mod.ChatPrompt", "chat_mod.ChatTemplate"]:
        """``messages`` rendered and tokenized (a ChatPrompt: text, tokens, generation prompt) and the
        template; message text is tokenized as plain text, never as control tokens (ChatTemplate.render_prompt)."""
        tmpl = chat_mod.resolve_template(template if template is not None else self.config.chat_template, self.model)
        # llama-server always passes enable_thinking (true unless turned off); llama.cpp's own fixed
        # templates (llama-cpp-deepseek-r1, DeepSeek-R1-Distill) close the think block when it is missing.
        template_kwargs["enable_thinking"] = True if enable_thinking is None else bool(enable_thinking)
        prompt = tmpl.render_prompt(messages, self.model, add_generation_prompt=True, tools=tools, **template_kwargs)
        return prompt, tmpl

    def stream_chat(
        self,
        messages: Sequence[dict],
        *,
        max_tokens: Union[int, str, None] = "auto",
        sampling: SamplingParams = GREEDY,
        stop: Sequence[str] = (),
        enable_thinking: Optional[bool] = None,
        tools: Optional[list] = None,
        template: Optional[str] = None,
        ignore_eos: bool = False,
        **template_kwargs,
    ) -> Generator[tuple[str, str], None, ChatResult]:
        """Yield the reply as ``(kind, text)`` pieces, kind ``"reasoning"`` or ``"content"``; return the ChatResult.

        ``messages``: OpenAI-style dicts (``role``, ``content``; an assistant turn may carry
        ``reasoning_content``). ``enable_thinking=False`` asks the template to turn thinking off;
        other keyword arguments (``reasoning_effort`` ...) are passed to the template. ``max_tokens``:
        ``"auto"`` (the default) is CHAT_MAX_TOKENS capped by the room the prompt leaves in the context;
        a number must fit beside the prompt (ContextFullError otherwise); None runs until an
        end-of-generation token or a full context. The result's ``stop_reason`` says which ended it.
        """
        if isinstance(max_tokens, str) and max_tokens != "auto":
            raise ConfigError(f"max_tokens={max_tokens!r} is not valid; expected 'auto', an integer >= 0 or None")
        chat_prompt, tmpl = self.chat_prompt(messages, template=template, enable_thinking=enable_thinking, tools=tools,
                                             **template_kwargs)
        prompt, tokens = chat_prompt.text, chat_prompt.tokens
        if not tokens:
            raise ConfigError("the chat template rendered an empty prompt; expected at least one token")
        capped = False
        if max_tokens == "auto":
            room = self.context.n_ctx - len(tokens)
            capped = 0 < room < CHAT_MAX_TOKENS  # no room at all: check_fits says so
            max_tokens = room if capped else CHAT_MAX_TOKENS
        parser = chat_mod.reasoning_parser_for(chat_prompt, tmpl)
        pieces: list[tuple[str, str]] = []
        gen = self.stream(tokens, max_tokens=max_tokens, sampling=sampling, stop=stop, ignore_eos=ignore_eos)
        try:
            while True:
                try:
                    piece = next(gen)
                except StopIteration as done:
                    result = done.value
                    break
                for kp in (parser.feed(piece) if parser is not None else [(chat_mod.CONTENT, piece)]):
                    pieces.append(kp)
                    yield kp
        finally:
            gen.close()  # closed early (consumer stopped, Ctrl-C): the decode loop records why and cleans up
        for kp in (parser.finish() if parser is not None else []):
            pieces.append(kp)
            yield kp
        if capped and result.stop_reason == StopReason.MAX_TOKENS:
            result.stop_reason = StopReason.CONTEXT_FULL  # the context's room, not a number asked for, ended it
        reasoning, content = chat_mod.join_pieces(pieces)
        return ChatResult(text=result.text, content=content, reasoning_content=reasoning, result=result, prompt=prompt)

    def chat(self, messages: Sequence[dict], **kwargs) -> ChatResult:
        """The whole reply to ``messages``; keyword arguments as for stream_chat()."""
        gen = self.stream_chat(messages, **kwargs)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    def generate(self, prompt: Union[str, Sequence[int]], **kwargs) -> GenerationResult:
        """Generate a completion; keyword arguments as for stream()."""
        stream = self.stream(prompt, **kwargs)
        for _ in stream:
            pass
        return stream.result


class Stream(Iterator[str]):
    """A generation in progress: iterate it for text pieces; ``.result`` is the GenerationResult once the
    iteration has ended (``None`` before). ``close()`` stops it early (stop reason ``cancelled``)."""

    def __init__(self, gen: Generator[str, None, GenerationResult], request: Request) -> None:
        self._gen = gen
        self._request = request
        self.result: Optional[GenerationResult] = None

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as done:
            self.result = done.value
            raise StopIteration(done.value) from None

    def close(self) -> None:
        self._gen.close()
        if self.result is None:
            self.result = self._request.result
