"""Synthetic GGUF models with random weights, written with the gguf writer of the vendored tree.

- ``write_llama``: a llama-architecture model with grouped-query attention (n_head_kv < n_head),
  of any size (tiny for tests; ~100-500M parameters for a GPU check).
- ``write_mla``: a DeepSeek-2-architecture model with multi-head latent attention (MLA), whose
  KV cache holds one compressed latent (kv_lora_rank + rope dims) per token and layer.

Both use a byte-level SPM vocabulary (<unk>, <s>, </s> and the 256 byte tokens), so any text
tokenizes; ``write_llama(..., n_vocab=N)`` pads it to a realistic size. Usable from tests and
scripts: ``python3 tests/synthetic_gguf.py llama OUT.gguf [n_vocab=151936 ...]``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GGUF_PY = ROOT / "vendor" / "llama.cpp" / "gguf-py"


def _gguf():
    if str(GGUF_PY) not in sys.path:
        sys.path.insert(0, str(GGUF_PY))
    import gguf

    return gguf


def _vocab(w, gguf, n_vocab: int = 0, special_tokens=()) -> int:
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    # Control tokens after the bytes (ids 259, 260 ...): a template's markup such as <tool_call>.
    tokens += [t.encode() for t in special_tokens]
    types += [gguf.TokenType.CONTROL] * len(special_tokens)
    if n_vocab > len(tokens):
        # Pad to a realistic vocabulary size (e.g. 151936) with distinct normal pieces: the output
        # layer, the logits copied per token and the greedy argmax then cost what they do for a real model.
        pad = n_vocab - len(tokens)
        tokens += ["\u2581".encode()] + [f"\u2581t{i}".encode() for i in range(pad - 1)]  # "\u2581": the space
        types += [gguf.TokenType.NORMAL] * pad
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    return len(tokens)


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _embeddings_and_output(w, rng, n_vocab: int, n_embd: int, dtype) -> None:
    w.add_tensor("token_embd.weight", _rand(rng, n_vocab, n_embd, dtype=dtype))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", _rand(rng, n_vocab, n_embd, dtype=dtype))


def _ffn_and_norms(w, rng, p: str, n_embd: int, n_ff: int, dtype) -> None:
    w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor(p + "ffn_gate.weight", _rand(rng, n_ff, n_embd, dtype=dtype))
    w.add_tensor(p + "ffn_up.weight", _rand(rng, n_ff, n_embd, dtype=dtype))
    w.add_tensor(p + "ffn_down.weight", _rand(rng, n_embd, n_ff, dtype=dtype))


def _rand(rng, *shape, dtype=np.float16, scale=0.02):
    return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)


def write_llama(path, *, n_embd=256, n_layer=4, n_head=8, n_head_kv=2, n_ff=512, n_ctx_train=8192,
                seed=0, dtype=np.float16, n_vocab=0, chat_template=None, add_space_prefix=None,
                special_tokens=()) -> Path:
    """A llama model with GQA; head size n_embd / n_head; n_vocab > 259 pads the byte vocabulary;
    ``chat_template`` (Jinja text) is written as tokenizer.chat_template; ``add_space_prefix=False``: the
    tokenizer adds no leading space (as the BPE vocabularies of GLM and Qwen, whose templates' generation
    prompts a grammar then reads token by token as the text itself); ``special_tokens``: texts added as control
    tokens with ids 259, 260 ... (a template's markup, e.g. ``<tool_call>``)."""
    gguf = _gguf()
    rng = np.random.default_rng(seed)
    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"synthetic-llama-{n_layer}L-{n_embd}")
    n_vocab = _vocab(w, gguf, n_vocab, special_tokens)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    hd = n_embd // n_head
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == np.float16 else gguf.LlamaFileType.ALL_F32)
    _embeddings_and_output(w, rng, n_vocab, n_embd, dtype)
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", _rand(rng, n_head * hd, n_embd, dtype=dtype))
        w.add_tensor(p + "attn_k.weight", _rand(rng, n_head_kv * hd, n_embd, dtype=dtype))
        w.add_tensor(p + "attn_v.weight", _rand(rng, n_head_kv * hd, n_embd, dtype=dtype))
        w.add_tensor(p + "attn_output.weight", _rand(rng, n_embd, n_head * hd, dtype=dtype))
        _ffn_and_norms(w, rng, p, n_embd, n_ff, dtype)
    _finish(w)
    return path


def write_mla(path, *, n_embd=256, n_layer=3, n_head=8, kv_lora_rank=128, qk_nope=32, qk_rope=32, v_head=32,
              n_ff=512, n_ctx_train=8192, seed=0) -> Path:
    """A DeepSeek-2 model with MLA: its cache is one latent of kv_lora_rank + qk_rope values per token."""
    gguf = _gguf()
    rng = np.random.default_rng(seed)
    path = Path(path)
    arch = "deepseek2"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"synthetic-mla-{n_layer}L-{n_embd}")
    n_vocab = _vocab(w, gguf)
    k_mla = qk_nope + qk_rope
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(1)                               # MLA: one shared latent "head"
    w.add_key_length(kv_lora_rank + qk_rope)             # what the cache stores for K
    w.add_value_length(kv_lora_rank)                     # ... and for V (a view of the same latent)
    w.add_uint32(f"{arch}.attention.key_length_mla", k_mla)
    w.add_uint32(f"{arch}.attention.value_length_mla", v_head)
    w.add_rope_dimension_count(qk_rope)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_q_lora_rank(0)
    w.add_kv_lora_rank(kv_lora_rank)
    w.add_leading_dense_block_count(n_layer)             # dense FFN everywhere: no experts needed
    w.add_expert_feed_forward_length(n_ff)
    w.add_expert_shared_count(0)
    w.add_expert_count(0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    f16 = np.float16
    _embeddings_and_output(w, rng, n_vocab, n_embd, f16)
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "attn_kv_a_norm.weight", np.ones(kv_lora_rank, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", _rand(rng, n_head * k_mla, n_embd, dtype=f16))
        w.add_tensor(p + "attn_kv_a_mqa.weight", _rand(rng, kv_lora_rank + qk_rope, n_embd, dtype=f16))
        w.add_tensor(p + "attn_k_b.weight", _rand(rng, n_head, kv_lora_rank, qk_nope, dtype=f16))
        w.add_tensor(p + "attn_v_b.weight", _rand(rng, n_head, v_head, kv_lora_rank, dtype=f16))
        w.add_tensor(p + "attn_output.weight", _rand(rng, n_embd, n_head * v_head, dtype=f16))
        _ffn_and_norms(w, rng, p, n_embd, n_ff, f16)
    _finish(w)
    return path


if __name__ == "__main__":
    kind, out = sys.argv[1], sys.argv[2]
    kwargs = {k: int(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])}
    print((write_llama if kind == "llama" else write_mla)(out, **kwargs))
