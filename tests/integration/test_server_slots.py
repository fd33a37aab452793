"""Saved sessions over HTTP, as llama-server's clients call them: POST /slots/{id}?action=save|restore|erase
with a file name inside --slot-save-path; names that leave the directory, files from another model or KV
type, truncated files and busy slots are refused with a 4xx, and the server keeps serving."""
from __future__ import annotations

import httpx
import pytest

from pyllm.batched import BatchedEngine
from pyllm.config import EngineConfig
from pyllm.server import create_app
from .serving import Running, wait_idle

PROMPT = "The story of a lighthouse keeper who kept a diary of every ship that passed"


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slots")


@pytest.fixture(scope="module")
def engine(default_model_path, save_dir):
    cfg = EngineConfig(model_path=str(default_model_path), n_ctx=1024, n_parallel=2, slot_save_path=str(save_dir))
    with BatchedEngine(cfg, max_queue=4) as eng:
        yield eng


@pytest.fixture(scope="module")
def url(engine):
    running = Running(create_app(engine))
    yield running.url
    running.stop()


def _post(url, path, **kw):
    return httpx.post(url + path, timeout=120, **kw)


def test_save_erase_restore_then_the_prompt_is_reused(url, engine, save_dir):
    r = _post(url, "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200
    wait_idle(engine)
    busy = [s for s in engine.slots() if s["n_cached"] > 0]
    assert len(busy) == 1
    sid, n_cached = busy[0]["id"], busy[0]["n_cached"]
    saved = _post(url, f"/slots/{sid}?action=save", json={"filename": "diary.bin"})
    assert saved.status_code == 200, saved.text
    assert saved.json()["n_saved"] == n_cached and (save_dir / "diary.bin").stat().st_size == saved.json()["n_written"]
    erased = _post(url, f"/slots/{sid}?action=erase")
    assert erased.status_code == 200 and erased.json()["n_erased"] == n_cached
    assert all(s["n_cached"] == 0 for s in engine.slots())
    restored = _post(url, f"/slots/{sid}?action=restore", json={"filename": "diary.bin"})
    assert restored.status_code == 200, restored.text
    assert restored.json()["n_restored"] == n_cached
    again = _post(url, "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert again["choices"][0]["text"] == r.json()["choices"][0]["text"]


@pytest.mark.parametrize("name", ["../escape.bin", "a/b.bin", "/etc/passwd", "..", "", 7])
def test_file_names_outside_the_directory_are_refused(url, name):
    r = _post(url, "/slots/0?action=save", json={"filename": name})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"].get("param") == "filename"


def test_bad_files_slots_and_actions_are_4xx_and_the_server_keeps_serving(url, engine, save_dir):
    (save_dir / "junk.bin").write_bytes(b"not a state file at all" * 10)
    r = _post(url, "/slots/0?action=restore", json={"filename": "junk.bin"})
    assert r.status_code == 400, r.text
    r = _post(url, "/slots/0?action=restore", json={"filename": "missing.bin"})
    assert r.status_code == 400, r.text
    if (save_dir / "diary.bin").exists():   # truncated: refused before llama.cpp reads it
        data = (save_dir / "diary.bin").read_bytes()
        (save_dir / "cut.bin").write_bytes(data[: len(data) // 2])
        r = _post(url, "/slots/0?action=restore", json={"filename": "cut.bin"})
        assert r.status_code == 400, r.text
    for path in ("/slots/9?action=erase", "/slots/x?action=erase", "/slots/0?action=fly"):
        assert _post(url, path).status_code == 400
    assert _post(url, "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_without_a_save_path_save_is_501(default_model_path):
    with BatchedEngine(EngineConfig(model_path=str(default_model_path), n_ctx=512), max_queue=1) as eng:
        running = Running(create_app(eng))
        try:
            r = httpx.post(running.url + "/slots/0?action=save", json={"filename": "x.bin"}, timeout=60)
            assert r.status_code == 501 and "--slot-save-path" in r.text
        finally:
            running.stop()
