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


def weight_devices(breakdown: list[dict], n_gpu_layers: int, n_layer: int) -> list[str]:
    """The devices a model's layers run on, from llama.cpp's memory breakdown of a context (bytes per
    buffer type): a buffer type named after a device (CUDA0, CUDA0_Split, RPC0[host:port]) is that device.
    The CPU's own buffer types (CPU, CPU_Mapped, CPU_REPACK) and GPU backends' host buffers (CUDA_Host)
    also hold the input embeddings, which llama.cpp keeps on the CPU whatever -ngl says, so the CPU counts
    when it holds layers: nothing is offloaded, or fewer than n_layer + 1 layers (the output included) are."""
    names = sorted((d.name for d in devices() if d.type != "cpu"), key=len, reverse=True)
    out = []
    for row in breakdown:
        if not row["model"]:
            continue
        dev = next((n for n in names if row["name"].startswith(n)), None)
        if dev is None and not row["is_host"] and not row["name"].startswith("CPU"):
            dev = row["name"]  # a device this process does not list: an RPC server's
        if dev is not None and dev not in out:
            out.append(dev)
    if not out or 0 <= n_gpu_layers < n_layer + 1:
        out.append("CPU")
    return out


def gpus() -> list[Device]:
    return [d for d in devices() if d.type == "gpu"]


def offload_devices() -> list[Device]:
    """This machine's devices layers can be offloaded to (-ngl): its GPUs, integrated ones included."""
    return [d for d in devices() if d.type in ("gpu", "igpu")]


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
    if _warned_no_gpu or offload_devices():
        return
    _warned_no_gpu = True
    devs = devices()
    logger.warning("%s asks for layers on a GPU, but no GPU device is visible (llama.cpp sees: %s); every "
                   "layer runs on the CPU. Set GPU_LAYERS=0 (-ngl 0) to say so, or --rpc to use another "
                   "machine's devices", label("n_gpu_layers", n_gpu_layers),
                   ", ".join(d.name for d in devs) or "no device")
