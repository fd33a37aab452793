"""Sampling through llama.cpp's sampler chain, configured from plain Python parameters."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

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

    def __post_init__(self) -> None:
        def num(name: str, lo: float, hi: float) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ConfigError(f"{name}={v!r} is out of range; expected a number in [{lo}, {hi}]")

        num("temperature", 0.0, 100.0)
        num("top_p", 0.0, 1.0)
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

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing that changes logits: an argmax read in place gives the same token."""
        return self.temperature == 0.0 and self.repeat_penalty == 1.0


class Sampler(NativeHandle):
    """A llama.cpp sampler chain built from SamplingParams; sample() also accepts the token."""

    _kind = "sampler"

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        cparams = lib.llama_sampler_chain_default_params()
        cparams.no_perf = True
        chain = lib.llama_sampler_chain_init(cparams)
        super().__init__(chain, lib.llama_sampler_free)
        self.params = params
        add = lambda s: lib.llama_sampler_chain_add(chain, s)  # noqa: E731 - the chain owns what it is given
        if params.repeat_penalty != 1.0:
            add(lib.llama_sampler_init_penalties(n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0))
        if params.temperature == 0.0:
            add(lib.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(lib.llama_sampler_init_top_k(params.top_k))
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
