"""What this build of pyllm is: version, llama.cpp pin, backends, CUDA choices, KV types."""
from __future__ import annotations

from typing import Any

from pyllm._ffi import ffi, lib
from pyllm._runtime import ensure_backend
from pyllm.devices import offload_devices
from pyllm.kvtypes import KV_CACHE_TYPES


def _s(ptr) -> str:
    return ffi.string(ptr).decode() if ptr != ffi.NULL else ""


def fa_kernel_pairs(fa_quants: str) -> list[tuple[str, str]]:
    """The K/V pairs with compiled CUDA flash-attention kernels, from GGML_CUDA_FA_QUANTS."""
    types = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "bf16", "f16")
    if not fa_quants:
        return []
    if fa_quants.strip().lower() == "all":
        return [(k, v) for k in types for v in types]
    pairs = [("f16", "f16")]  # always compiled by ggml
    for item in fa_quants.replace(";", ",").split(","):
        k, _, v = item.strip().lower().partition("-")
        if k and v and (k, v) not in pairs:
            pairs.append((k, v))
    return pairs


def compiled_fa_pairs() -> list[tuple[str, str]]:
    """The K/V pairs this build has CUDA flash-attention kernels for (empty for a CPU build)."""
    return fa_kernel_pairs(_s(lib.pyllm_build_fa_quants())) if has_cuda() else []


def build_info() -> dict[str, Any]:
    """The build identity baked into the extension, plus what llama.cpp reports at run time."""
    ensure_backend()  # backends register (and may log, e.g. "no CUDA driver") through our log routing
    backends = [b for b in _s(lib.pyllm_build_backends()).split(",") if b]
    gpu_devices = [f"{d.name} ({d.description})" for d in offload_devices()]
    fa_quants = _s(lib.pyllm_build_fa_quants())
    cuda = "CUDA" in backends
    return {
        "version": _s(lib.pyllm_build_version()),
        "llama_cpp_commit": _s(lib.pyllm_build_llama_commit()),
        "llama_cpp_version": _s(lib.llama_version()),
        "backends": backends,
        "cuda_architectures": [a for a in _s(lib.pyllm_build_cuda_archs()).split(",") if a] if cuda else [],
        "cuda_fa_quants": fa_quants if cuda else None,
        "cuda_fa_kernel_pairs": ["-".join(p) for p in compiled_fa_pairs()],
        "cuda_vmm": bool(lib.pyllm_build_cuda_vmm()) if cuda else None,
        # llama_supports_gpu_offload() also says yes for a build with RPC compiled in; this is whether a GPU
        # backend has a device here that layers can be offloaded to (-ngl).
        "supports_gpu_offload": bool(gpu_devices),
        "gpu_devices": gpu_devices,
        "rpc": bool(lib.pyllm_build_rpc()) and bool(lib.llama_supports_rpc()),
        "rpc_protocol": _rpc_protocol(),
        "supports_mmap": bool(lib.llama_supports_mmap()),
        "supports_mlock": bool(lib.llama_supports_mlock()),
        "kv_cache_types": list(KV_CACHE_TYPES),
        "system_info": _s(lib.llama_print_system_info()).strip(),
    }


def _rpc_protocol() -> str:
    from pyllm.rpc import RPC_PROTO_MAJOR_VERSION, RPC_PROTO_MINOR_VERSION

    return f"{RPC_PROTO_MAJOR_VERSION}.{RPC_PROTO_MINOR_VERSION}"


def has_cuda() -> bool:
    return "CUDA" in _s(lib.pyllm_build_backends()).split(",")


# CMakeLists.txt builds llama.cpp with LLAMA_BUILD_NUMBER 0 (the pinned sdist has no git history to count).
LLAMA_BUILD_NUMBER = 0


def build_info_line() -> str:
    """llama.cpp's build string for this build, ``b<build number>-<commit>`` (what llama-server reports as
    ``system_fingerprint`` and ``build_info``), with pyllm's version after it."""
    return f"b{LLAMA_BUILD_NUMBER}-{_s(lib.pyllm_build_llama_commit())}-pyllm-{_s(lib.pyllm_build_version())}"
