"""Chat end to end: a synthetic GGUF that carries GLM-4.7-Flash's template, and the default Gemma model."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pyllm import Engine, EngineConfig, chat
from pyllm.errors import ChatTemplateError, ConfigError, ContextFullError

pytestmark = pytest.mark.skipif(chat.templates_dir() is None, reason="llama.cpp's models/templates not available")

CLI = [sys.executable, "-c", "import sys; from pyllm.cli import main; sys.exit(main())"]
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
# GLM-4.7-Flash's documented prompt for MSGS (thinking on: the prompt opens the reasoning block)
GLM_PROMPT = "[gMASK]<sop><|system|>Be brief.<|user|>Hi<|assistant|><think>"


@pytest.fixture(scope="module")
def glm_model_path(synthetic, tmp_path_factory):
    text = (chat.templates_dir() / "GLM-4.7-Flash.jinja").read_text(encoding="utf-8")
    return synthetic.write_llama(tmp_path_factory.mktemp("chat") / "glm-synthetic.gguf", n_embd=64, n_layer=2,
                                 n_head=4, n_head_kv=2, n_ff=128, chat_template=text)


@pytest.fixture(scope="module")
def glm_engine(glm_model_path):
    with Engine(EngineConfig(model_path=str(glm_model_path), n_ctx=512, n_threads=2)) as e:
        yield e


def test_gguf_template_is_the_default_and_prompt_tokens_are_right(glm_engine):
    model = glm_engine.model
    assert model.chat_template().startswith("[gMASK]<sop>")
    assert model.apply_chat_template(MSGS) == GLM_PROMPT
    r = glm_engine.chat(MSGS, max_tokens=8)
    assert r.prompt == GLM_PROMPT
    expected = model.tokenize(GLM_PROMPT, add_special=True, parse_special=True)
    assert expected[0] == model.bos and expected.count(model.bos) == 1
    assert glm_engine.tokenize_chat_text(r.prompt) == expected
    assert r.n_prompt == len(expected) and r.n_generated == 8 and r.stop_reason == "max_tokens"
    # The prompt ends inside <think>: without a </think> in the output, everything is reasoning.
    if "</think>" not in r.text:
        assert r.reasoning_content == r.text.strip() and r.content == ""


def test_thinking_off_closes_the_block_and_output_is_content(glm_engine):
    r = glm_engine.chat(MSGS, max_tokens=6, enable_thinking=False)
    assert r.prompt == GLM_PROMPT[: -len("<think>")] + "</think>"
    assert r.reasoning_content == "" and r.content == r.text.strip()


def test_stream_chat_pieces(glm_engine):
    gen = glm_engine.stream_chat(MSGS + [{"role": "assistant", "content": "Hello", "reasoning_content": "greet"},
                                         {"role": "user", "content": "Again"}], max_tokens=6)
    pieces = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as done:
            result = done.value
            break
    assert result.prompt == ("[gMASK]<sop><|system|>Be brief.<|user|>Hi<|assistant|></think>Hello"
                             "<|user|>Again<|assistant|><think>")
    assert all(k in ("reasoning", "content") and t for k, t in pieces)
    assert pieces and chat.join_pieces(pieces) == (result.reasoning_content, result.content)
    assert pieces[0][0] == "reasoning"                    # the prompt ended inside <think>


def test_model_chat_template_glm4_on_a_glm_gguf(glm_model_path):
    cfg = EngineConfig.from_env({"MODEL_PATH": str(glm_model_path), "MODEL_CHAT_TEMPLATE": "glm4"}, n_ctx=256)
    with Engine(cfg) as e:
        tmpl = chat.resolve_template(cfg.chat_template, e.model)
        assert tmpl.source.startswith("glm4 (tokenizer.chat_template of glm-synthetic.gguf")
        assert e.chat(MSGS, max_tokens=2).prompt == GLM_PROMPT
        assert e.generate("Hi", chat=True, max_tokens=2).n_prompt == len(
            e.model.tokenize("[gMASK]<sop><|user|>Hi<|assistant|><think>", add_special=True, parse_special=True))


def test_template_that_writes_bos_gets_no_second_bos(glm_engine):
    model = glm_engine.model
    r = glm_engine.chat(MSGS, max_tokens=1, template="{{ bos_token }}{{ messages[-1].content }}")
    assert r.prompt == "<s>Hi"
    toks = glm_engine.tokenize_chat_text(r.prompt)
    assert toks[0] == model.bos and toks.count(model.bos) == 1


def test_bad_messages_through_the_engine(glm_engine):
    with pytest.raises(ChatTemplateError, match=r"message 0 is 'hi'"):
        glm_engine.chat(["hi"])
    with pytest.raises(ChatTemplateError, match=r"unknown chat template 'nope'"):
        glm_engine.chat(MSGS, template="nope")


def test_cli_chat_and_generate_on_the_glm_gguf(glm_model_path, tmp_path):
    env = {**os.environ, "MODEL_PATH": str(glm_model_path), "MAX_CONTEXT_LENGTH": "256"}
    out = subprocess.run(CLI + ["chat", "-n", "4", "--temp", "0"], input="Hi\n", capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("[reasoning] ")          # not a terminal: reasoning is prefixed
    out = subprocess.run(CLI + ["chat", "-n", "4", "--temp", "0", "--hide-reasoning"], input="Hi\n",
                         capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert out.returncode == 0 and "[reasoning]" not in out.stdout
    out = subprocess.run(CLI + ["generate", "--chat", "Hi", "-n", "2"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300, env={**env, "MODEL_CHAT_TEMPLATE": "glm4"})
    assert out.returncode == 0, out.stderr
    out = subprocess.run(CLI + ["info", "--chat-templates"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and "glm4" in out.stdout and "GLM-4.7-Flash" in out.stdout


def test_default_gemma_chats(default_model_path):
    with Engine(EngineConfig(model_path=str(default_model_path), n_ctx=512)) as e:
        if e.model.chat_template() is None:
            # This GGUF has no tokenizer.chat_template: its architecture picks llama.cpp's gemma format.
            assert chat.resolve_template(None, e.model).builtin == "gemma"
        r = e.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=8)
        assert r.prompt == "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
        toks = e.tokenize_chat_text(r.prompt)
        assert toks[0] == e.model.bos and toks.count(e.model.bos) == 1
        start_of_turn = e.model.tokenize("<start_of_turn>", add_special=False, parse_special=True)
        assert len(start_of_turn) == 1 and toks.count(start_of_turn[0]) == 2
        assert r.n_generated > 0 and r.content == r.text.strip() and r.reasoning_content == ""
        assert e.chat([{"role": "user", "content": "Hi"}], max_tokens=2, template="gemma").prompt.startswith(
            "<start_of_turn>user\nHi")


LONG = "Tell me about the sea. " * 36  # a chat prompt of 225 tokens for the default model: a 256-token context has little room


def test_chat_without_max_tokens_gets_the_room_left_in_the_context(default_model_path):
    with Engine(EngineConfig(model_path=str(default_model_path), n_ctx=256)) as e:
        r = e.chat([{"role": "user", "content": LONG}])
        room = e.n_ctx - r.n_prompt
        assert 0 < room < 64 and 0 < r.n_generated <= room, (room, r.n_generated)
        assert r.stop_reason in ("eog", "context_full")    # the room, not a number asked for, bounds it
        with pytest.raises(ContextFullError, match="does not fit in n_ctx=256"):
            e.chat([{"role": "user", "content": LONG}], max_tokens=room + 1)   # an explicit number must fit
        with pytest.raises(ConfigError, match="max_tokens='all' is not valid; expected 'auto'"):
            e.chat(MSGS, max_tokens="all")


def test_cli_chat_caps_its_default_reply_and_prints_the_stop_reason(default_model_path, tmp_path):
    env = {**os.environ, "MODEL_PATH": str(default_model_path)}
    out = subprocess.run(CLI + ["chat", "-c", "256", "--temp", "0"], input=LONG, capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"\[stop: (eog|context_full), \d+ tokens\]", out.stderr.strip()), out.stderr
    out = subprocess.run(CLI + ["chat", "-c", "256", "-n", "100"], input=LONG, capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, env=env)
    assert out.returncode == 1 and "does not fit in n_ctx=256" in out.stderr, out.stderr
