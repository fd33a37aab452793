"""Where a model's layers go: the device list (llama.cpp RPC servers' devices, then this box's GPUs),
split mode, per-device shares (tensor_split) and main GPU, checked before llama.cpp sees them.

llama.cpp reads ``tensor_split`` as one float per device and ``main_gpu`` as an index into its device
list without checking either against the list's length; pyllm checks both here, naming the setting.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from pyllm.errors import ConfigError

_SPLIT_MODES = {"none": "LLAMA_SPLIT_MODE_NONE", "layer": "LLAMA_SPLIT_MODE_LAYER", "row": "LLAMA_SPLIT_MODE_ROW"}
TS_NAME = "tensor_split (-ts, LLAMA_TENSOR_SPLIT)"
MG_NAME = "main_gpu (-mg, LLAMA_MAIN_GPU)"


def _name(dev) -> str:
    from pyllm._ffi import ffi, lib

    name = ffi.string(lib.ggml_backend_dev_name(dev)).decode()
    desc = ffi.string(lib.ggml_backend_dev_description(dev)).decode()
    return f"{name} ({desc})" if desc and desc != name else name


def local_gpu_devices() -> list:
    """This box's devices as llama.cpp's default device list takes them: discrete GPUs, else integrated
    ones (the CPU is handled separately: the layers that are not offloaded)."""
    from pyllm._ffi import lib
    from pyllm._runtime import ensure_backend

    ensure_backend()
    gpus, igpus = [], []
    for i in range(int(lib.ggml_backend_dev_count())):
        dev = lib.ggml_backend_dev_get(i)
        t = int(lib.ggml_backend_dev_type(dev))
        if t == int(lib.GGML_BACKEND_DEVICE_TYPE_GPU):
            gpus.append(dev)
        elif t == int(lib.GGML_BACKEND_DEVICE_TYPE_IGPU):
            igpus.append(dev)
    return gpus or igpus


@dataclass
class Placement:
    """The model parameters for one load, and the native objects they point at (kept alive here)."""

    split_mode: str = "layer"
    tensor_split: Optional[tuple[float, ...]] = None
    main_gpu: int = 0
    rpc_servers: Optional[tuple[str, ...]] = None
    rpc_timeout: float = 120.0
    # llama.cpp's CPU weight repacking (use_extra_bufts; llama-cli --no-repack turns it off). Remote CPU
    # devices never repack, so a run that must match a split bit for bit turns it off locally too.
    repack: bool = True
    device_names: list[str] = field(default_factory=list)
    _keep: list = field(default_factory=list, repr=False)

    def apply(self, params: Any) -> None:
        """Fill a llama_model_params; connects to the RPC servers (checked first: RPCError naming one)."""
        from pyllm._ffi import ffi, lib
        from pyllm import rpc

        if self.split_mode not in _SPLIT_MODES:
            raise ConfigError(f"split_mode={self.split_mode!r} is not a split mode; expected one of: {', '.join(_SPLIT_MODES)}")
        remote = rpc.server_devices(self.rpc_servers, timeout=min(rpc.PROBE_TIMEOUT, self.rpc_timeout)) \
            if self.rpc_servers else []
        devs = remote + local_gpu_devices()
        self.device_names = [_name(d) for d in devs]
        n = len(devs)
        listed = ", ".join(self.device_names) or "none"
        if self.tensor_split is not None:
            if n == 0:
                raise ConfigError(f"{TS_NAME}={','.join(f'{x:g}' for x in self.tensor_split)} but the model has no "
                                  "device to split over (no GPU visible and no RPC server given with --rpc)")
            if len(self.tensor_split) > n:
                raise ConfigError(f"{TS_NAME} has {len(self.tensor_split)} values but the model has {n} device(s): "
                                  f"{listed}; expected at most {n} values, in that order")
        if n and self.main_gpu >= n:
            raise ConfigError(f"{MG_NAME}={self.main_gpu} is out of range: the model has {n} device(s): {listed}; "
                              f"expected 0..{n - 1}")
        if not n and self.main_gpu != 0:
            raise ConfigError(f"{MG_NAME}={self.main_gpu} but no GPU is visible and no RPC server is given; expected 0")
        params.split_mode = getattr(lib, _SPLIT_MODES[self.split_mode])
        params.use_extra_bufts = bool(self.repack)
        params.main_gpu = self.main_gpu
        if self.tensor_split is not None:
            ts = ffi.new("float[]", max(int(lib.llama_max_devices()), n))
            for i, x in enumerate(self.tensor_split):
                ts[i] = x
            params.tensor_split = ts
            self._keep.append(ts)
        if remote:
            arr = ffi.new("ggml_backend_dev_t[]", n + 1)  # NULL-terminated
            for i, d in enumerate(devs):
                arr[i] = d
            params.devices = arr
            self._keep.append(arr)

    def watch_connections(self) -> Optional["_Watcher"]:
        """While a load runs: give ggml-rpc's sockets their timeouts as soon as they open."""
        return _Watcher(self.rpc_servers, self.rpc_timeout) if self.rpc_servers else None


class _Watcher:
    def __init__(self, endpoints: Sequence[str], timeout: float) -> None:
        from pyllm import rpc

        self._stop = threading.Event()
        self._arm = lambda: rpc.arm_connections(endpoints, timeout)
        self._thread = threading.Thread(target=self._run, name="pyllm-rpc-arm", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._arm()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._arm()
