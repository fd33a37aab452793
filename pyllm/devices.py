"""The backend devices llama.cpp sees (CPU, CUDA0, ...) and their memory."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pyllm._ffi import ffi, lib
from pyllm._runtime import ensure_backend

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


def resolve_gpu_layers(n_gpu_layers: Optional[int]) -> int:
    """-ngl as given, or its default when None: every layer where a GPU is visible, else 0 (one rule
    for every command)."""
    if n_gpu_layers is not None:
        return n_gpu_layers
    return 99 if gpus() else 0
