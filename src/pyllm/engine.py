"""The engine: a model and one context configured from EngineConfig, and the decode loop."""
from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Iterator, Optional, Sequence, Union

from pyllm import chat as chat_mod
from pyllm import default_model
from pyllm.chat import ChatResult
from pyllm.config import CHAT_MAX_TOKENS, EngineConfig
from pyllm.context import Context, KVCacheBytes
from pyllm.devices import resolve_gpu_layers
from pyllm.errors import ConfigError, ContextFullError, DecodeAbortedError
from pyllm.model import Model, check_model_file
from pyllm.placement import Placement
from pyllm.sampling import Sampler, SamplingParams, bias_arrays
from pyllm.textstream import TextStream

GREEDY = SamplingParams(temperature=0.0)


class StopReason(str, enum.Enum):
    """Why a generation ended; equal to its lower-case string (``StopReason.EOG == "eog"``)."""

    EOG = "eog"                      # an end-of-generation token
    MAX_TOKENS = "max_tokens"
    STOP = "stop"                    # a stop string
    CONTEXT_FULL = "context_full"
    INTERRUPTED = "interrupted"      # Ctrl-C
    CANCELLED = "cancelled"          # the consumer closed the stream, or cancelled the request
    ABORTED = "aborted"              # Context.abort() from another thread; Ctrl-C in the batched engine
    ERROR = "error"                  # the batched engine ended this request on an error (GenerationResult.error)

    def __str__(self) -> str:
        return self.value


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    n_prompt: int
    stop_reason: StopReason
    prompt_ns: int = 0
    gen_ns: int = 0                  # from the end of the prompt to the last token
    n_prompt_decoded: int = 0        # prompt tokens actually decoded
    n_prompt_cached: int = 0         # prompt tokens whose K/V were reused from the cache instead of decoded
    error: Optional[BaseException] = None  # what ended a generation with stop_reason ERROR

    @property
    def n_generated(self) -> int:
        return len(self.tokens)

    @property
    def prompt_seconds(self) -> float:
        return self.prompt_ns / 1e9

    @property
    def gen_seconds(self) -> float:
        return self.gen_ns / 1e9

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt_decoded / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        # The first generated token comes from the prompt's logits; the rest each cost one decode.
        n = max(self.n_generated - 1, 0)
        return n / self.gen_seconds if self.gen_seconds > 0 and n else 0.0


def load_model(config: EngineConfig) -> Model:
    """The model a config names (the default model without MODEL_PATH), loaded as it says."""
    return Model(model_path_of(config), n_gpu_layers=gpu_layers_of(config), use_mmap=config.use_mmap,
                 use_mlock=config.use_mlock, placement=placement_of(config))


def model_path_of(config: EngineConfig) -> str:
    """The model file a config names, checked (ModelLoadError naming MODEL_PATH or -m and the .env file it
    came from), or the default model's."""
    if config.model_path is None:
        return str(default_model.path())
    check_model_file(Path(config.model_path), config.source("model_path"))
    return config.model_path


def gpu_layers_of(config: EngineConfig) -> int:
    """-ngl as given; without it, every layer where a GPU is visible or RPC servers are given, else 0."""
    return gpu_layers_for(config.n_gpu_layers, placement_of(config))


def gpu_layers_for(n_gpu_layers: Optional[int], placement: Optional[Placement]) -> int:
    remote = placement is not None and bool(placement.rpc_servers)
    if n_gpu_layers is None and remote:
        return 99
    return resolve_gpu_layers(n_gpu_layers, remote_devices=remote)


def placement_of(config: EngineConfig) -> Placement:
    """Where the config puts the model's layers: split mode, shares, main GPU, RPC servers."""
    return Placement(split_mode=config.split_mode, tensor_split=config.tensor_split, main_gpu=config.main_gpu,
                     rpc_servers=config.rpc_servers, rpc_timeout=config.rpc_timeout, repack=config.repack)


class Engine:
    """Loads the configured model and creates its context; generates text.

    ``Engine()`` reads the environment (``EngineConfig.from_env()``); without MODEL_PATH it
    uses the default model. Close it (or use ``with``) to free native memory.
    """

    def __init__(self, config: Optional[EngineConfig] = None, *, model: Optional[Model] = None) -> None:
        """``model``: an already loaded model to share (the engine then closes only its context)."""
        self.config = config = config if config is not None else EngineConfig.from_env()
        self._owns_model = model is None
        self.model = model = model if model is not None else load_model(config)
        try:
            self.context = Context(
                self.model,
                n_ctx=config.n_ctx,
                n_batch=config.n_batch,
                n_ubatch=config.n_ubatch,
                n_threads=config.n_threads,
                n_threads_batch=config.n_threads_batch,
                flash_attn=config.flash_attn,
                type_k=config.kv_cache_type_k,
                type_v=config.kv_cache_type_v,
                offload_kqv=config.offload_kqv,
            )
        except BaseException:
            if self._owns_model:
                self.model.close()
            raise
        self._cached: list[int] = []   # tokens whose K/V are in the cache, in order
        self.last_result: Optional[GenerationResult] = None

    # ---- lifetime ----
    def close(self) -> None:
        self.context.close()
        if self._owns_model:
            self.model.close()

    def reset(self) -> None:
        """Empty the KV cache: the next generation starts from nothing."""
        self.context.clear()
        self._cached = []

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reporting ----
    def kv_cache_bytes(self) -> KVCacheBytes:
        return self.context.kv_cache_bytes()

    @property
    def n_ctx(self) -> int:
        return self.context.n_ctx

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
        """Put the prompt in the cache, reusing the longest cached prefix; returns tokens decoded."""
        ctx = self.context
        keep = 0
        for a, b in zip(self._cached, tokens[:-1]):  # the last prompt token is always decoded (for logits)
            if a != b:
                break
            keep += 1
        if keep < ctx.n_past:
            ctx.truncate(keep)  # may clear everything (sliding-window caches cannot drop a suffix)
        keep = ctx.n_past
        self._cached = tokens[:keep]
        todo = tokens[keep:]
        ctx.decode(todo, logits="last")
        self._cached = list(tokens)
        return len(todo)

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
        """
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0):
            raise ConfigError(f"max_tokens={max_tokens!r} is out of range; expected an integer >= 0 or None")
        stops = [s for s in stop if s]
        if any(not isinstance(s, str) for s in stops):
            raise ConfigError(f"stop={list(stop)!r}: stop strings must be str")
        if sampling.seed is None and self.config.seed is not None and not sampling.is_plain_greedy:
            sampling = dataclasses.replace(sampling, seed=self.config.seed)
        if ignore_eos:
            sampling = sampling.with_banned(self.model.eog_tokens)
        sampling.check_vocab(self.model.n_vocab)
        prompt_tokens = self.tokenize_prompt(prompt, chat=chat)
        check_fits(len(prompt_tokens), max_tokens, self.context.n_ctx)
        result = GenerationResult(text="", tokens=[], n_prompt=len(prompt_tokens), stop_reason=StopReason.MAX_TOKENS)
        return Stream(self._run(result, prompt_tokens, max_tokens, sampling, stops, ignore_eos), result)

    def _run(
        self, result: GenerationResult, prompt_tokens: list[int], max_tokens: Optional[int], sampling: SamplingParams,
        stops: list[str], ignore_eos: bool = False,
    ) -> Generator[str, None, GenerationResult]:
        self.last_result = result
        t0 = time.perf_counter_ns()
        try:
            result.n_prompt_decoded = self.ingest(prompt_tokens)
            result.n_prompt_cached = result.n_prompt - result.n_prompt_decoded
        except (DecodeAbortedError, KeyboardInterrupt) as exc:
            result.stop_reason = StopReason.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else StopReason.ABORTED
            result.prompt_ns = time.perf_counter_ns() - t0
            if isinstance(exc, KeyboardInterrupt):
                raise
            return result
        result.prompt_ns = time.perf_counter_ns() - t0
        sampler = None if sampling.is_plain_greedy else Sampler(sampling, self.model.n_vocab)
        bias = bias_arrays(sampling) if sampler is None else None
        try:
            yield from self._generate(result, max_tokens, sampler, TextStream(stops), ignore_eos, bias)
        finally:
            if sampler is not None:
                sampler.close()
        return result

    def _generate(self, result: GenerationResult, max_tokens: Optional[int], sampler: Optional[Sampler],
                  text: TextStream, ignore_eos: bool, bias=None) -> Generator[str, None, None]:
        """The decode loop: sample, stop checks, detokenize, decode the token; fills ``result``."""
        ctx, model = self.context, self.model
        pieces: list[str] = []
        out_tokens, cached = result.tokens, self._cached
        limit = max_tokens if max_tokens is not None else ctx.n_ctx
        is_eog, piece_of = model.is_eog, model.token_to_piece
        argmax, decode_one = (lambda: ctx.argmax(-1, bias)), ctx.decode_one
        t1 = time.perf_counter_ns()
        try:
            while len(out_tokens) < limit:
                token = argmax() if sampler is None else sampler.sample(ctx)
                if is_eog(token) and not ignore_eos:
                    result.stop_reason = StopReason.EOG
                    break
                out_tokens.append(token)
                piece = text.feed(piece_of(token))
                if piece:
                    pieces.append(piece)
                    yield piece
                if text.stopped:
                    result.stop_reason = StopReason.STOP
                    break
                if len(out_tokens) >= limit:
                    result.stop_reason = StopReason.MAX_TOKENS if max_tokens is not None else StopReason.CONTEXT_FULL
                    break
                if ctx.n_past >= ctx.n_ctx:
                    result.stop_reason = StopReason.CONTEXT_FULL
                    break
                cached.append(token)  # before the decode: an interrupt inside it may or may not have stored it,
                decode_one(token)     # and the finally below trims the record to what llama.cpp holds
        except DecodeAbortedError:
            result.stop_reason = StopReason.ABORTED
        except (KeyboardInterrupt, GeneratorExit) as exc:
            # Interrupted (Ctrl-C) or closed by the consumer: keep what was produced in
            # engine.last_result, leave the context usable, then let the exception go on.
            result.stop_reason = StopReason.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else StopReason.CANCELLED
            result.text = "".join(pieces) + text.finish()
            result.gen_ns = time.perf_counter_ns() - t1
            raise
        finally:
            del cached[ctx.n_past:]
        rest = text.finish()
        if rest:
            pieces.append(rest)
            yield rest
        result.gen_ns = time.perf_counter_ns() - t1
        result.text = "".join(pieces)

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


def check_fits(n_prompt: int, max_tokens: Optional[int], n_ctx: int) -> None:
    """A prompt plus the tokens asked for must fit the context; nothing is ever silently truncated."""
    if n_prompt >= n_ctx or (max_tokens is not None and n_prompt + max_tokens > n_ctx):
        want = n_prompt + (max_tokens or 0)
        raise ContextFullError(
            f"prompt of {n_prompt} tokens + max_tokens={max_tokens} = {want} does not fit in "
            f"n_ctx={n_ctx}; shorten the prompt, lower max_tokens, or raise n_ctx (MAX_CONTEXT_LENGTH / -c)"
        )


class Stream(Iterator[str]):
    """A generation in progress: iterate it for text pieces; ``.result`` is the GenerationResult once the
    iteration has ended (``None`` before). ``close()`` stops it early (stop reason ``cancelled``)."""

    def __init__(self, gen: Generator[str, None, GenerationResult], result: GenerationResult) -> None:
        self._gen = gen
        self._result = result
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
        started = self._gen.gi_frame is not None and self._gen.gi_frame.f_lasti >= 0
        self._gen.close()
        if started and self.result is None:
            self.result = self._result
