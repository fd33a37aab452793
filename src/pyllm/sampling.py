"""Sampling through llama.cpp's sampler chain, configured from plain Python parameters."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Union

import numpy as np

from pyllm._ffi import ffi, lib
from pyllm._handle import NativeHandle
from pyllm.errors import ConfigError


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

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing that depends on earlier tokens: an argmax read in place (with the logit
        bias added there, see ``argmax_biased``) gives the same token as the sampler chain."""
        return self.temperature == 0.0 and self.repeat_penalty == 1.0

    @property
    def backend_capable(self) -> bool:
        """Whether llama.cpp can run this chain inside the decode graph (backend sampling): every sampler
        it builds has a backend implementation (all but typical-p)."""
        return self.typical_p >= 1.0

    def with_banned(self, tokens: Iterable[int]) -> "SamplingParams":
        """These params with a -inf bias on ``tokens`` too (``ignore_eos``: the end-of-generation tokens,
        as llama.cpp's --ignore-eos does)."""
        extra = tuple((int(t), -math.inf) for t in tokens)
        return dataclasses.replace(self, logit_bias=self.logit_bias + extra) if extra else self

    def check_vocab(self, n_vocab: int) -> None:
        """Raise ConfigError for a logit_bias token outside [0, n_vocab): llama.cpp would write out of bounds."""
        for token, _ in self.logit_bias:
            if token >= n_vocab:
                raise ConfigError(f"logit_bias token {token} is outside the vocabulary; expected 0 <= id < {n_vocab}")


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
    """A llama.cpp sampler chain built from SamplingParams; sample() also accepts the token."""

    _kind = "sampler"

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        params.check_vocab(n_vocab)
        cparams = lib.llama_sampler_chain_default_params()
        cparams.no_perf = True
        chain = lib.llama_sampler_chain_init(cparams)
        super().__init__(chain, lib.llama_sampler_free)
        self.params = params
        add = lambda s: lib.llama_sampler_chain_add(chain, s)  # noqa: E731 - the chain owns what it is given
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
        """Sample from output row idx of a context (pyllm.Context) and accept the token."""
        return int(lib.llama_sampler_sample(self.ptr, ctx.ptr, idx))

    def reset(self) -> None:
        lib.llama_sampler_reset(self.ptr)

    @property
    def chain(self) -> list[str]:
        n = int(lib.llama_sampler_chain_n(self.ptr))
        return [ffi.string(lib.llama_sampler_name(lib.llama_sampler_chain_get(self.ptr, i))).decode() for i in range(n)]
