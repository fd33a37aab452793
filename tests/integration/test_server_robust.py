"""pyllm serve when things go wrong on the server's side: broken chat templates, text a format would lose
(NUL characters, messages a built-in format has no place for), and what the server logs.

The app runs on a random port in a uvicorn thread around one module engine (the default model, whose GGUF
has no chat template: llama.cpp's built-in ``gemma`` format renders it); start-up is tested on a real
``python -m pyllm.server`` process.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from pyllm.batched import BatchedEngine
from pyllm.config import EngineConfig
from pyllm.errors import ChatTemplateError
from pyllm.server import create_app
from .serving import Running as _Running, free_port as _free_port, wait_idle as _wait_idle

N_CTX, N_PARALLEL = 1024, 2

# A Jinja template of Gemma's format (what llama.cpp's built-in 'gemma' renders, system turns aside).
GEMMA_JINJA = ("{{ bos_token }}{% for m in messages %}"
               "<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content }}<end_of_turn>\n"
               "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
# Hugging Face's usual refusal: the conversation, not the template, is wrong.
ALTERNATING_JINJA = ("{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
                     "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                     "{% endif %}{% endfor %}" + GEMMA_JINJA)




@pytest.fixture(scope="module")
def engine(default_model_path):
    config = EngineConfig(model_path=str(default_model_path), n_ctx=N_CTX, n_parallel=N_PARALLEL)
    with BatchedEngine(config, max_queue=4) as eng:
        yield eng


@pytest.fixture(scope="module")
def served(engine):
    """url of an app per chat template (None: the model's own, llama.cpp's built-in 'gemma')."""
    running: dict = {}

    def url(template=None) -> str:
        if template not in running:
            running[template] = _Running(create_app(engine, chat_template=template))
        return running[template].url

    yield url
    for r in running.values():
        r.stop()


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def _error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err



def _chat(url: str, messages: list, **extra) -> httpx.Response:
    return _post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 1, "temperature": 0, **extra})


HELLO = [{"role": "user", "content": "Hello"}]


# ---------------------------------------------------------------------------------------------
# Broken templates: at start-up, and as the server's fault
# ---------------------------------------------------------------------------------------------
def test_create_app_with_a_template_that_does_not_compile_raises(engine, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(ChatTemplateError, match=r"bad\.jinja has a syntax error at line 2"):
        create_app(engine, chat_template=str(bad))
    with pytest.raises(ChatTemplateError, match=r"unknown chat template 'gemmma'"):
        create_app(engine, chat_template="gemmma")
    assert not engine.closed


def test_serve_refuses_to_start_with_a_template_that_does_not_compile(tmp_path, default_model_path):
    bad = tmp_path / "broken.jinja"
    bad.write_text("{{ bos_token }}\n{% for m in messages %}{{ m.content }}\n")   # no endfor
    out = subprocess.run([sys.executable, "-m", "pyllm.server", "--port", str(_free_port()), "-c", "512", "-np", "1",
                          "--chat-template", str(bad)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MODEL_PATH": str(default_model_path)})
    assert out.returncode != 0, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("pyllm: error: chat template ") and "broken.jinja" in last, out.stderr
    assert "has a syntax error at line 2" in last, out.stderr


def test_a_template_refusing_the_conversation_is_400_and_a_template_bug_is_500(served, engine):
    url = served(ALTERNATING_JINJA)
    assert _chat(url, HELLO).status_code == 200
    r = _chat(url, [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}])
    err = _error(r)
    assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] == "messages"
    assert "roles must alternate" in err["message"]
    for text, fragment in (("{{ messages[0].content - 1 }}", "TypeError"),           # a bug in the template
                           ("{{ 'x' * 9000000 }}", "characters"),                    # the sandbox's size limit
                           ("{{ messages.__class__.__mro__ }}", "template text")):   # what the sandbox forbids
        r = _chat(served(text), HELLO)
        err = _error(r)
        assert r.status_code == 500 and err["type"] == "server_error", (text, r.text)
        assert fragment in err["message"] and "template" in err["message"], (text, err)
        assert _chat(url, HELLO).status_code == 200   # and the server keeps serving
    _wait_idle(engine)


# ---------------------------------------------------------------------------------------------
# Text a format would lose: the default model's built-in 'gemma' format
# ---------------------------------------------------------------------------------------------
def test_builtin_format_refuses_a_message_it_would_drop(served, engine):
    url = served()
    r = _chat(url, [{"role": "system", "content": "You are a pirate. Answer in pirate speak."}])
    err = _error(r)
    assert r.status_code == 400 and err["param"] == "messages", r.text
    assert "message 0" in err["message"] and "'system'" in err["message"] and "gemma" in err["message"], err
    # The same system message before a user turn is rendered (gemma folds it into that turn).
    ok = _chat(url, [{"role": "system", "content": "You are a pirate."}, *HELLO])
    assert ok.status_code == 200
    assert ok.json()["usage"]["prompt_tokens"] > _chat(url, HELLO).json()["usage"]["prompt_tokens"] + 4
    _wait_idle(engine)


# ---------------------------------------------------------------------------------------------
# NUL characters: kept on every text path, or refused naming the field
# ---------------------------------------------------------------------------------------------
TAIL = " and then the text after it goes on for a good many more words"


def test_nul_in_a_message_of_a_builtin_format_is_refused(served):
    r = _chat(served(), [{"role": "user", "content": "Hello\x00" + TAIL}])
    err = _error(r)
    assert r.status_code == 400 and err["param"] == "messages", r.text
    assert "message 0" in err["message"] and "NUL" in err["message"], err


def test_nul_in_a_message_of_a_jinja_template_is_kept(served, engine):
    url = served(GEMMA_JINJA)
    short = _chat(url, [{"role": "user", "content": "Hello"}]).json()["usage"]["prompt_tokens"]
    r = _chat(url, [{"role": "user", "content": "Hello\x00" + TAIL}])
    assert r.status_code == 200, r.text
    tail = len(engine.model.tokenize("\x00" + TAIL, add_special=False))
    assert r.json()["usage"]["prompt_tokens"] == short + tail


def test_nul_in_tokenize_and_completion_prompts_is_kept(served, engine):
    url = served()
    text = "Hello\x00" + TAIL
    r = _post(url, "/tokenize", {"content": text})
    tokens = r.json()["tokens"]
    assert engine.model.detokenize(tokens) == text
    assert _post(url, "/detokenize", {"tokens": tokens}).json() == {"content": text}
    r = _post(url, "/v1/completions", {"prompt": text, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(tokens) + 1   # + BOS


def test_nul_in_a_stop_string_is_part_of_it(served, engine):
    url = served()
    body = {"prompt": "The days of the week are Monday,", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    full = _post(url, "/v1/completions", body).json()["choices"][0]["text"]
    word = full.split()[0]
    assert word and "\x00" not in full
    cut = _post(url, "/v1/completions", {**body, "stop": [word]}).json()["choices"][0]
    assert cut["text"] == full[:full.index(word)] and cut["finish_reason"] == "stop"
    # "word\0" never appears in the output: a stop string cut at its NUL would stop at "word".
    kept = _post(url, "/v1/completions", {**body, "stop": [word + "\x00"]}).json()["choices"][0]
    assert kept["text"] == full and kept["finish_reason"] == "length"


# ---------------------------------------------------------------------------------------------
# What pyllm serve logs: one start-up summary, one line per request
# ---------------------------------------------------------------------------------------------
def test_serve_logs_what_it_loaded_and_one_line_per_request(tmp_path, default_model_path):
    port, key, secret = _free_port(), "k3y-never-logged", "SECRET-PROMPT-TEXT"
    proc = subprocess.Popen([sys.executable, "-m", "pyllm.server", "--port", str(port), "-c", "512", "-np", "2",
                             "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MODEL_PATH": str(default_model_path), "PYLLM_API_KEY": key})
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", headers=auth, timeout=60,
                       json={"prompt": secret, "max_tokens": 2, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert key not in out and secret not in out, out
    summary = [line for line in out.splitlines() if line.startswith("pyllm.server: INFO: serving ")]
    assert len(summary) == 1, out
    for fragment in (default_model_path.name, "n_ctx=512", "n_parallel=2", "K q8_0 ", "MiB + V q8_0 ",
                     "flash_attn=on", "chat template: llama.cpp built-in 'gemma'"):
        assert fragment in summary[0], (fragment, summary[0])
    access = [line.split("INFO: ", 1)[1] for line in out.splitlines() if line.startswith("pyllm.server.access: INFO: ")]
    assert any(line.startswith("GET /health 200 ") for line in access), access
    assert [line.rsplit(" ", 1)[0] for line in access if "/health" not in line] == [
        "POST /v1/completions 200", "GET /v1/models 401"], access
    assert all(line.endswith("s") and float(line.rsplit(" ", 1)[1][:-1]) >= 0 for line in access), access


# ---------------------------------------------------------------------------------------------
# Faults the fuzz (test_server_fuzz.py) found
# ---------------------------------------------------------------------------------------------
def test_a_sampling_value_c_cannot_hold_is_400_not_a_hung_request(served, engine):
    url = served()
    for field, value in (("top_k", 2**31), ("top_k", 2**63)):
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, field: value}, timeout=20)
        err = _error(r)
        assert r.status_code == 400 and err["param"] == field and "out of range" in err["message"], r.text
    assert _post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "top_k": 2**31 - 1}).status_code == 200
    _wait_idle(engine)


def test_a_request_that_cannot_start_fails_alone_and_frees_its_slot(served, engine, monkeypatch):
    import pyllm.sequence

    url = served()
    real = pyllm.sequence.Sampler   # where a request builds its sampler chain when it is admitted

    def broken(params, n_vocab, **kw):
        if params.top_k == 7:
            raise RuntimeError("injected: this sampler cannot be built")
        return real(params, n_vocab, **kw)

    monkeypatch.setattr(pyllm.sequence, "Sampler", broken)
    for stream in (False, True):
        r = httpx.post(url + "/v1/completions", timeout=20,
                       json={"prompt": "Hi", "max_tokens": 2, "top_k": 7, "stream": stream})
        if stream:   # the stream had started (200): the error is its last event before [DONE]
            assert r.status_code == 200 and '"type":"server_error"' in r.text and "injected" in r.text, r.text
        else:
            assert r.status_code == 500 and _error(r)["type"] == "server_error" and "injected" in r.text, r.text
    s = _wait_idle(engine, timeout=5)
    assert s["kv_cells_reserved"] == 0
    for _ in range(N_PARALLEL + 1):   # every slot is free again
        assert _post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "top_k": 8}).status_code == 200
