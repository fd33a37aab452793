"""The build's guard rails: the pinned fetch, the fix-it message, CUDA configuration."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cmake() -> str:
    exe = shutil.which("cmake")
    if exe is None:
        pytest.fail("cmake is not on PATH (it is a build requirement: pip install cmake)")
    return exe


def test_fetch_rejects_a_wrong_hash(tmp_path, fetch_module):
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the pinned sdist")
    proc = subprocess.run([sys.executable, str(ROOT / "vendor" / "fetch.py"), "--sdist", str(fake), "--force"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "sha256 mismatch" in proc.stderr and "refusing to use it" in proc.stderr
    assert fetch_module.read_pin()["sdist_sha256"] in proc.stderr
    # The existing tree is untouched by a refused sdist.
    assert (ROOT / "vendor" / "llama.cpp" / "include" / "llama.h").exists()


def test_fetch_is_idempotent():
    proc = subprocess.run([sys.executable, str(ROOT / "vendor" / "fetch.py")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout


def test_llama_cpp_sources_are_not_tracked():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "vendor"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert sorted(out.split()) == ["vendor/fetch.py", "vendor/llama.cpp.pin"]


def test_configure_without_vendor_tree_names_the_fetch_command(tmp_path):
    src = tmp_path / "src"
    (src / "vendor").mkdir(parents=True)
    shutil.copy(ROOT / "CMakeLists.txt", src)
    shutil.copy(ROOT / "VERSION", src)
    shutil.copy(ROOT / "vendor" / "llama.cpp.pin", src / "vendor")
    proc = subprocess.run([_cmake(), "-S", str(src), "-B", str(tmp_path / "build")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "vendor/llama.cpp is missing" in out
    assert "python3 vendor/fetch.py" in out


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="no CUDA toolkit (nvcc) on this machine")
def test_cuda_configure_finds_the_toolkit(tmp_path):
    """PYLLM_CUDA=1 configures llama.cpp's CUDA backend, or fails loudly; never a silent CPU build."""
    env = dict(os.environ)
    cublas = env.get("PYLLM_CUBLAS_ROOT", "")
    args = [_cmake(), "-S", str(ROOT), "-B", str(tmp_path / "build"), "-DPYLLM_CUDA=ON",
            "-DCMAKE_CUDA_ARCHITECTURES=90", f"-DPython_EXECUTABLE={sys.executable}"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    no_driver = not any(Path(p).exists() for p in ("/usr/lib/x86_64-linux-gnu/libcuda.so", "/usr/local/cuda/lib64/stubs/libcuda.so"))
    if no_driver:
        args.append("-DGGML_CUDA_NO_VMM=ON")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "pyllm: CUDA toolkit " in out and "nvcc" in out
    if cublas and Path(cublas, "include", "cublas_v2.h").exists():
        assert proc.returncode == 0, out[-2000:]
        assert "Including CUDA backend" in out
        assert "FlashAttention K-V type combinations: f16-f16;q4_0-q4_0;q8_0-q8_0;bf16-bf16" in out
    else:
        # This toolkit has no cuBLAS: the configure must stop with the fix, not build for the CPU.
        assert proc.returncode != 0
        assert "needs cuBLAS" in out and "PYLLM_CUBLAS_ROOT" in out
