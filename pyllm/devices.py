"""The backend devices llama.cpp sees (CPU, CUDA0, ...) and their memory."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from pyllm._ffi import ffi, lib
from pyllm._runtime import ensure_backend
from pyllm.config import label

logger = logging.getLogger("pyllm")
_warned_no_gpu = False

_TYPES = {
    int(lib.GGML_BACKEND_DEVICE_TYPE_CPU): "cpu",
    int(lib.GGML_BACKEND_DEVICE_TYPE_GPU): "gpu",
    int(lib.GGML_BACKEND_DEVICE_TYPE_IGPU): "igpu",
    int(lib.GGML_BACKEND_DEVICE_TYPE_ACCEL): "accel",
}


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    type: str
    free: int
    total: int


def devices() -> list[Device]:
    ensure_backend()
    out = []
    free, total = ffi.new("size_t *"), ffi.new("size_t *")
    for i in range(int(lib.ggml_backend_dev_count())):
        dev = lib.ggml_backend_dev_get(i)
        lib.ggml_backend_dev_memory(dev, free, total)
        out.append(Device(
            name=ffi.string(lib.ggml_backend_dev_name(dev)).decode(),
            description=ffi.string(lib.ggml_backend_dev_description(dev)).decode(),
            type=_TYPES.get(int(lib.ggml_backend_dev_type(dev)), "other"),
            free=int(free[0]), total=int(total[0]),
        ))
    return out


def gpus() -> list[Device]:
    return [d for d in devices() if d.type == "gpu"]


def resolve_gpu_layers(n_gpu_layers: Optional[int], *, remote_devices: bool = False) -> int:
    """-ngl as given, or its default when None: every layer where a GPU is visible, else 0 (one rule
    for every command). ``remote_devices``: RPC servers' devices are given, so layers have somewhere to go
    without a local GPU. Layers asked for where there is no device to take them run on the CPU, as
    llama.cpp runs them, with a warning (once per process)."""
    if n_gpu_layers is None:
        return 99 if gpus() else 0
    if n_gpu_layers != 0 and not remote_devices:
        _warn_no_gpu(n_gpu_layers)
    return n_gpu_layers


def _warn_no_gpu(n_gpu_layers: int) -> None:
    global _warned_no_gpu
    if _warned_no_gpu:
        return
    devs = devices()
    if any(d.type in ("gpu", "igpu") for d in devs):
        return
    _warned_no_gpu = True
    logger.warning("%s asks for layers on a GPU, but no GPU device is visible (llama.cpp sees: %s); every "
                   "layer runs on the CPU. Set GPU_LAYERS=0 (-ngl 0) to say so, or --rpc to use another "
                   "machine's devices", label("n_gpu_layers", n_gpu_layers),
                   ", ".join(d.name for d in devs) or "no device")
