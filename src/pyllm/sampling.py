"""Sampling through llama.cpp's sampler chain, configured from plain Python parameters.

A GBNF grammar (``SamplingParams.grammar``) is applied first, before every other sampler, as llama.cpp's
``common_sampler`` applies it (``common/sampling.cpp``: grammar, then the chain); a lazy grammar waits for
one of its triggers. Grammar chains sample through a checked glue call, so a grammar that allows no token
raises GrammarError instead of accepting a rejected token (which can abort llama.cpp)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np

from pyllm import _runtime
from pyllm import log as native_log
from pyllm._ffi import ffi, lib
from pyllm._handle import NativeHandle
from pyllm.chat_common import check_grammar
from pyllm.errors import ConfigError, GrammarError


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's sampling knobs, with its defaults. ``temperature == 0`` is greedy."""

    temperature: float = 0.8       # --temp
    top_k: int = 40                # --top-k (0 = off)
    top_p: float = 0.95            # --top-p (1.0 = off)
    min_p: float = 0.05            # --min-p (0.0 = off)
    repeat_penalty: float = 1.0    # --repeat-penalty (1.0 = off)
    repeat_last_n: int = 64        # --repeat-last-n
    seed: Optional[int] = None     # --seed (None: random)
    typical_p: float = 1.0         # --typical (1.0 = off)
    # --logit-bias: (token, bias) pairs added to those tokens' logits before anything else (llama.cpp's
    # logit-bias sampler); -inf bans a token. A {token: bias} mapping is accepted and kept as pairs.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # --grammar: GBNF text the output must match ("" = none), start rule ``root``; checked by llama.cpp's
    # grammar parser here (GrammarError with its reason). Needs the model: Sampler(..., model=).
    grammar: str = ""
    # A lazy grammar constrains nothing until a trigger appears in the output: a token id of
    # grammar_trigger_tokens, or a match of a regex (std::regex, ECMAScript) of grammar_trigger_patterns
    # searched in the text generated so far (llama_sampler_init_grammar_lazy_patterns). ChatParams.grammar_sampling
    # (pyllm.chat_common) derives these from a chat template's tool-call grammar.
    grammar_lazy: bool = False
    grammar_trigger_patterns: tuple[str, ...] = ()
    grammar_trigger_tokens: tuple[int, ...] = ()
    # Text the template already put at the start of the reply (its generation prompt): a non-lazy grammar
    # from a chat template is advanced past its tokens before sampling, as common_sampler_init does for
    # output-format and tool-call grammars (never for a user's own grammar: leave it "").
    grammar_prefill: str = ""

    def __post_init__(self) -> None:
        def num(name: str, lo: float, hi: float) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ConfigError(f"{name}={v!r} is out of range; expected a number in [{lo}, {hi}]")

        num("temperature", 0.0, 100.0)
        num("top_p", 0.0, 1.0)
        num("typical_p", 0.0, 1.0)
        num("min_p", 0.0, 1.0)
        num("repeat_penalty", 0.0, 100.0)
        if self.repeat_penalty == 0.0:
            raise ConfigError("repeat_penalty=0 is out of range; expected a number > 0 (1.0 = off)")
        for name in ("top_k", "repeat_last_n"):   # int32_t in llama.cpp's sampler API
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not -1 <= v <= 2**31 - 1:
                raise ConfigError(f"{name}={v!r} is out of range; expected an integer in [-1, 2**31-1] (0 = off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32):
            raise ConfigError(f"seed={self.seed!r} is out of range; expected an integer in [0, 2**32) or None")
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        self._check_grammar()

    def _check_grammar(self) -> None:
        if not isinstance(self.grammar, str):
            raise ConfigError(f"grammar is a {type(self.grammar).__name__}; expected GBNF text (a str, '' = none)")
        if not isinstance(self.grammar_lazy, bool):
            raise ConfigError(f"grammar_lazy={self.grammar_lazy!r}; expected True or False")
        if not isinstance(self.grammar_prefill, str):
            raise ConfigError(f"grammar_prefill is a {type(self.grammar_prefill).__name__}; expected a str")
        patterns, tokens = self.grammar_trigger_patterns, self.grammar_trigger_tokens
        if isinstance(patterns, (str, bytes)) or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(f"grammar_trigger_patterns={patterns!r}: expected a sequence of non-empty regex strings")
        if isinstance(tokens, (str, bytes)) or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0 for t in tokens):
            raise ConfigError(f"grammar_trigger_tokens={tokens!r}: expected a sequence of token ids (integers >= 0)")
        object.__setattr__(self, "grammar_trigger_patterns", tuple(patterns))
        object.__setattr__(self, "grammar_trigger_tokens", tuple(int(t) for t in tokens))
        if not self.grammar:
            if self.grammar_lazy or patterns or tokens or self.grammar_prefill:
                raise ConfigError("grammar_lazy, grammar_trigger_* and grammar_prefill need a grammar; grammar is empty")
            return
        if self.grammar_lazy:
            if not patterns and not tokens:
                raise ConfigError("grammar_lazy=True needs at least one trigger (grammar_trigger_patterns or "
                                  "grammar_trigger_tokens); without one the grammar would never apply")
            if self.grammar_prefill:
                raise ConfigError("grammar_prefill applies to a non-lazy grammar only (llama.cpp feeds the generation "
                                  "prompt to a grammar that is active from the start)")
        elif patterns or tokens:
            raise ConfigError("grammar triggers were given for a grammar that is not lazy; set grammar_lazy=True "
                              "or drop the triggers")
        check_grammar(self.grammar)

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing that depends on earlier tokens: an argmax read in place (with the logit
        bias added there, see ``argmax_biased``) gives the same token as the sampler chain."""
        return self.temperature == 0.0 and self.repeat_penalty == 1.0 and not self.grammar

    @property
    def backend_capable(self) -> bool:
        """Whether llama.cpp can run this chain inside the decode graph (backend sampling): every sampler
        it builds has a backend implementation (all but typical-p and a grammar)."""
        return self.typical_p >= 1.0 and not self.grammar

    def with_banned(self, tokens: Iterable[int]) -> "SamplingParams":
        """These params with a -inf bias on ``tokens`` too (``ignore_eos``: the end-of-generation tokens,
        as llama.cpp's --ignore-eos does)."""
        extra = tuple((int(t), -math.inf) for t in tokens)
        return dataclasses.replace(self, logit_bias=self.logit_bias + extra) if extra else self

    def for_choice(self, index: int) -> "SamplingParams":
        """These params for choice ``index`` of several from one prompt (``BatchedEngine.submit_n``): a set
        seed becomes ``(seed + index) % 0xFFFFFFFF``, so each choice draws its own tokens, the same ones on
        every run (llama-server adds the child's index to the seed too; the modulus keeps a derived seed off
        LLAMA_DEFAULT_SEED, which would mean "random"). No seed, or LLAMA_DEFAULT_SEED itself: every
        choice's chain is seeded at random, as llama-server leaves it."""
        if index == 0 or self.seed is None or self.seed == lib.LLAMA_DEFAULT_SEED:
            return self
        return dataclasses.replace(self, seed=(self.seed + index) % lib.LLAMA_DEFAULT_SEED)

    def check_vocab(self, n_vocab: int) -> None:
        """Raise ConfigError for a logit_bias token outside [0, n_vocab): llama.cpp would write out of bounds."""
        for token, _ in self.logit_bias:
            if token >= n_vocab:
                raise ConfigError(f"logit_bias token {token} is outside the vocabulary; expected 0 <= id < {n_vocab}")
        for token in self.grammar_trigger_tokens:
            if token >= n_vocab:
                raise ConfigError(f"grammar_trigger_tokens token {token} is outside the vocabulary; expected "
                                  f"0 <= id < {n_vocab}")


def _bias_pairs(value: Union[Mapping, Iterable, None]) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    try:
        pairs = [tuple(p) for p in items]
    except TypeError:
        raise ConfigError(f"logit_bias={value!r}: expected a {{token: bias}} mapping or (token, bias) pairs") from None
    for pair in pairs:
        if len(pair) != 2:
            raise ConfigError(f"logit_bias entry {pair!r}: expected a (token, bias) pair")
        token, bias = pair
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or token < 0:
            raise ConfigError(f"logit_bias token {token!r}: expected a token id (an integer >= 0)")
        if (isinstance(bias, bool) or not isinstance(bias, (int, float, np.floating)) or math.isnan(bias)
                or bias == math.inf):
            raise ConfigError(f"logit_bias[{token}]={bias!r}: expected a finite number, or -inf to ban the token")
        out.append((int(token), float(bias)))
    return tuple(out)


def bias_arrays(params: SamplingParams) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The logit bias as (token ids, biases) arrays for ``argmax_biased``; None without one."""
    if not params.logit_bias:
        return None
    ids, vals = zip(*params.logit_bias)
    return np.asarray(ids, dtype=np.intp), np.asarray(vals, dtype=np.float32)


def argmax_biased(logits_ptr, n_vocab: int, bias: tuple[np.ndarray, np.ndarray]) -> int:
    """Greedy over one logits row plus a logit bias, read in place: the biases are added to the row
    (as llama.cpp's logit-bias sampler adds them, repeats summed), the argmax read, the row restored
    (logprobs are read from it afterwards)."""
    ids, vals = bias
    row = np.frombuffer(ffi.buffer(logits_ptr, 4 * n_vocab), dtype=np.float32)
    saved = row[ids]
    np.add.at(row, ids, vals)
    try:
        return int(lib.pyllm_argmax_f32(logits_ptr, n_vocab))
    finally:
        row[ids] = saved


class Sampler(NativeHandle):
    """A llama.cpp sampler chain built from SamplingParams; sample() also accepts the token.

    ``model`` (a pyllm.Model) is needed for a grammar, which reads the model's vocabulary: the sampler is then
    closed with the model. Raises ConfigError for a grammar without ``model``, GrammarError when llama.cpp
    cannot build the grammar (a bad trigger regex, a left-recursive rule ...: its reason in the message)."""

    _kind = "sampler"

    def __init__(self, params: SamplingParams, n_vocab: int, *, model: Optional[Any] = None) -> None:
        params.check_vocab(n_vocab)
        if params.grammar and model is None:
            raise ConfigError("a grammar needs the model's vocabulary: build the Sampler with model=<the Model>")
        if model is not None and model.n_vocab != n_vocab:
            raise ConfigError(f"n_vocab={n_vocab} is not the model's ({model.n_vocab})")
        grammar = _grammar_sampler(params, model) if params.grammar else None
        cparams = lib.llama_sampler_chain_default_params()
        cparams.no_perf = True
        chain = lib.llama_sampler_chain_init(cparams)
        try:
            super().__init__(chain, lib.llama_sampler_free)
        except BaseException:
            if grammar is not None:
                lib.llama_sampler_free(grammar)
            raise
        self.params = params
        self._model = model
        add = lambda s: lib.llama_sampler_chain_add(chain, s)  # noqa: E731 - the chain owns what it is given
        self._grammar = grammar
        if grammar is not None:
            add(grammar)  # before everything else: common_sampler applies the grammar before its chain
            model.add_dependent(self)  # the grammar reads the model's vocabulary
        if params.logit_bias:  # first, as in llama.cpp's common sampler
            arr = ffi.new("llama_logit_bias[]", len(params.logit_bias))
            for i, (token, bias) in enumerate(params.logit_bias):
                arr[i].token, arr[i].bias = token, bias
            add(lib.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), arr))
        if params.repeat_penalty != 1.0:
            add(lib.llama_sampler_init_penalties(n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0))
        if params.temperature == 0.0:
            add(lib.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(lib.llama_sampler_init_top_k(params.top_k))
        if params.typical_p < 1.0:
            add(lib.llama_sampler_init_typical(params.typical_p, 1))
        if params.top_p < 1.0:
            add(lib.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(lib.llama_sampler_init_min_p(params.min_p, 1))
        add(lib.llama_sampler_init_temp(params.temperature))
        seed = lib.LLAMA_DEFAULT_SEED if params.seed is None else params.seed
        add(lib.llama_sampler_init_dist(seed))

    def sample(self, ctx, idx: int = -1) -> int:
        """Sample from output row idx of a context (pyllm.Context) and accept the token. With a grammar:
        GrammarError when the grammar allows no token there."""
        if self._grammar is None:
            return int(lib.llama_sampler_sample(self.ptr, ctx.ptr, idx))
        err = ffi.new("char **")
        token = int(lib.pyllm_sampler_sample_checked(self.ptr, ctx.ptr, idx, err))
        message = _take_text(err[0])
        if token < 0:
            raise GrammarError(f"sampling with the grammar failed: {message}")
        return token

    def reset(self) -> None:
        """Back to the start of an output: the grammar (re-advanced past ``grammar_prefill``) and penalties."""
        lib.llama_sampler_reset(self.ptr)
        if self._grammar is not None and self.params.grammar_prefill:
            _prefill(self._grammar, self.params.grammar_prefill, self._model)

    @property
    def chain(self) -> list[str]:
        n = int(lib.llama_sampler_chain_n(self.ptr))
        return [ffi.string(lib.llama_sampler_name(lib.llama_sampler_chain_get(self.ptr, i))).decode() for i in range(n)]


def _take_text(ptr) -> str:
    if ptr == ffi.NULL:
        return ""
    try:
        return ffi.string(ptr).decode("utf-8", "replace")
    finally:
        lib.pyllm_str_free(ptr)


def _grammar_sampler(params: SamplingParams, model):
    """llama_sampler_init_grammar (lazy: _lazy_patterns) for ``params``, advanced past ``grammar_prefill``."""
    vocab = model.vocab_ptr
    keep = [ffi.new("char[]", p.encode("utf-8")) for p in params.grammar_trigger_patterns]
    patterns = ffi.new("const char *[]", keep) if keep else ffi.NULL
    tokens = ffi.new("llama_token[]", list(params.grammar_trigger_tokens)) if params.grammar_trigger_tokens else ffi.NULL
    err = ffi.new("char **")
    _runtime.ensure_backend()
    with native_log.capture() as lines:
        smpl = lib.pyllm_sampler_init_grammar(vocab, params.grammar.encode("utf-8"), b"root", params.grammar_lazy,
                                              patterns, len(keep), tokens, len(params.grammar_trigger_tokens), err)
    message = _take_text(err[0])
    _runtime.raise_pending()
    if smpl == ffi.NULL:
        reason = native_log.reason_from(lines)
        raise GrammarError(f"llama.cpp cannot build the grammar: {message}" + (f" ({reason})" if reason else ""))
    if params.grammar_prefill:
        try:
            _prefill(smpl, params.grammar_prefill, model)
        except BaseException:
            lib.llama_sampler_free(smpl)
            raise
    return smpl


def _prefill(grammar, text: str, model) -> None:
    """Feed the generation prompt's tokens to the grammar sampler (common_sampler_init's prefill: tokenized
    with special tokens parsed; a first token that only adds a leading space is skipped)."""
    tokens = model.tokenize(text, add_special=False, parse_special=True)
    for i, token in enumerate(tokens):
        piece = model.token_to_piece(token, special=True)
        if i == 0 and piece[:1].isspace() and not text[:1].isspace():
            continue
        err = ffi.new("char **")
        if lib.pyllm_sampler_accept_checked(grammar, token, err) != 0:
            raise GrammarError(f"the grammar does not accept the generation prompt {text!r} it was made for: "
                               f"{_take_text(err[0])}")
