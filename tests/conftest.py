"""Shared fixtures: the vendored tree's vocab-only GGUFs and the real default model."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT / "vendor" / "llama.cpp"


def _vocab(name: str) -> Path:
    path = VENDOR / "models" / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `python3 vendor/fetch.py`")
    return path


@pytest.fixture(scope="session")
def vocab_spm() -> Path:
    return _vocab("llama-spm")


@pytest.fixture(scope="session")
def vocab_bpe() -> Path:
    return _vocab("llama-bpe")


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The real default model (installed by `pip install .[test]`); a missing one fails, never skips."""
    if os.environ.get("MODEL_PATH"):
        return Path(os.environ["MODEL_PATH"])
    from pyllm import default_model

    return default_model.path()


def _load_script(name: str, path: Path):
    """A script of the repository (not part of the package) loaded as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def fetch_module():
    """vendor/fetch.py."""
    return _load_script("pyllm_vendor_fetch", ROOT / "vendor" / "fetch.py")


@pytest.fixture(scope="session")
def synthetic():
    """tests/synthetic_gguf.py: writers of random-weight GGUF models (llama GQA, DeepSeek-2 MLA)."""
    return _load_script("pyllm_synthetic_gguf", ROOT / "tests" / "synthetic_gguf.py")


@pytest.fixture(scope="session")
def gqa_model_path(synthetic, tmp_path_factory) -> Path:
    return synthetic.write_llama(tmp_path_factory.mktemp("gguf") / "gqa.gguf", n_head=8, n_head_kv=2)


@pytest.fixture(scope="session")
def mla_model_path(synthetic, tmp_path_factory) -> Path:
    return synthetic.write_mla(tmp_path_factory.mktemp("gguf") / "mla.gguf")


@pytest.fixture
def sigint_raises():
    """Ctrl-C raises KeyboardInterrupt for the test's duration, even where the runner started pytest with
    SIGINT ignored (nohup, some CI runners); the runner's own handler is restored afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
