"""GPU tests: run only with a CUDA build of pyllm and a visible GPU; skipped otherwise."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def _gpu_available() -> tuple[bool, str]:
    from pyllm.buildinfo import has_cuda
    from pyllm.devices import gpus

    if not has_cuda():
        return False, "pyllm was built without CUDA (PYLLM_CUDA=1 builds it)"
    if not gpus():
        return False, "no GPU is visible"
    return True, ""


def pytest_collection_modifyitems(config, items):
    ok, why = _gpu_available()
    if not ok and os.environ.get("PYLLM_REQUIRE_GPU") == "1":
        # On the GPU machine (benchmarks/gpu_check.sh) a skip would hide a broken CUDA build.
        raise pytest.UsageError(f"PYLLM_REQUIRE_GPU=1 but the GPU tests cannot run: {why}")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.gpu)
            if not ok:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def gpu_model_path(synthetic, tmp_path_factory) -> Path:
    """A llama-architecture model of realistic shape (~240M parameters, random f16 weights), made here:
    GPU machines have no network. PYLLM_GPU_MODEL reuses one written by benchmarks/gpu_check.sh."""
    if os.environ.get("PYLLM_GPU_MODEL"):
        return Path(os.environ["PYLLM_GPU_MODEL"])
    return synthetic.write_llama(tmp_path_factory.mktemp("gpu") / "llama-240m.gguf", n_embd=1024, n_layer=16,
                                 n_head=16, n_head_kv=4, n_ff=4096, n_ctx_train=32768)
