"""Host bytes of a saved sequence state per KV cache type, and how many sessions a --cache-ram budget holds.

A byte count, not a timing: for each K/V type it decodes a session of --session-tokens tokens into one sequence
and reads the size llama.cpp gives its state (``Context.seq_state_size``, what ``seq_state_get`` returns and a
prompt-cache entry or a slot file holds) at several lengths. Per token: the growth between two lengths inside
the sliding window (every layer grows) and, for a model with one, past it (only the full-attention layers grow),
next to the ratio the types' blocks give (q8_0: 34 bytes per 32 values = 34/64 of f16; q4_0: 18/64).

    python benchmarks/state_bytes.py                          # the default model, f16 q8_0 q4_0, 4096 tokens
    python benchmarks/state_bytes.py -m model.gguf --session-tokens 16384 --cache-ram 8192
"""
from __future__ import annotations

import argparse
import sys

from pyllm.config import default_cache_ram_mib
from pyllm.context import Context
from pyllm.kvtypes import block_size, parse_kv_cache_type, type_size
from pyllm.model import Model

TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange salt, "
        "wool and grain. Over the centuries it grew into a market town, then a port, and finally a capital. ")


def measure(model: Model, kv_type: str, lengths: list[int], flash_attn: str) -> dict[int, int]:
    """State bytes of one sequence after each of ``lengths`` tokens (ascending)."""
    base = model.tokenize(TEXT, add_special=False)
    tokens = [model.bos] + (base * (lengths[-1] // len(base) + 1))[:lengths[-1] - 1]
    n_ctx = -(-lengths[-1] // 256) * 256
    out = {}
    with Context(model, n_ctx=n_ctx, n_batch=min(2048, n_ctx), n_ubatch=512, type_k=kv_type, type_v=kv_type,
                 flash_attn=flash_attn) as ctx:
        done = 0
        for n in lengths:
            ctx.decode(tokens[done:n], logits="none")
            done = n
            out[n] = ctx.seq_state_size(0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF file (default: the default model)")
    ap.add_argument("--types", default="f16,q8_0,q4_0", help="K = V types, comma-separated (default f16,q8_0,q4_0)")
    ap.add_argument("--session-tokens", type=int, default=4096, help="tokens of one session (default 4096)")
    ap.add_argument("--cache-ram", type=int, default=None,
                    help=f"MiB of prompt cache (--cache-ram; default pyllm's, {default_cache_ram_mib()} here)")
    ap.add_argument("-fa", "--flash-attn", default="auto", help="auto, on, off (default auto)")
    args = ap.parse_args(argv)
    if args.model is None:
        from pyllm import default_model

        args.model = str(default_model.path())
    cache_mib = default_cache_ram_mib() if args.cache_ram is None else args.cache_ram
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    with Model(args.model) as model:
        swa = model.n_swa
        n = args.session_tokens
        inside = (64, 256) if not swa else (64, min(256, swa - 1))
        past = (swa + 1024, swa + 2048) if swa else None
        lengths = sorted({*inside, *(past or ()), n})
        print(f"model: {model.desc} ({args.model}); n_layer {model.n_layer}, n_head_kv {model.n_head_kv}, "
              f"sliding window {swa or 'none'}; flash attention {args.flash_attn}")
        print(f"session: {n:,} tokens; --cache-ram {cache_mib:,} MiB "
              f"({'no limit' if cache_mib < 0 else 'off' if cache_mib == 0 else f'{cache_mib * 2**20:,} bytes'})\n")
        rows = []
        for t in types:
            sizes = measure(model, t, lengths, args.flash_attn)
            per_in = (sizes[inside[1]] - sizes[inside[0]]) / (inside[1] - inside[0])
            per_past = (sizes[past[1]] - sizes[past[0]]) / (past[1] - past[0]) if past else None
            g = parse_kv_cache_type(t)
            rows.append((t, per_in, per_past, type_size(g) / block_size(g) / 2, sizes[n]))
        f16 = next((r for r in rows if r[0] == "f16"), None)
        print("| K = V | bytes/token, window (all layers) | vs f16 | bytes/token past the window | vs f16 | "
              "block ratio | state of one session | entry (state + 4 B/token) | sessions in --cache-ram |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for t, per_in, per_past, block, size in rows:
            entry = size + 4 * n
            fit = "no limit" if cache_mib < 0 else f"{cache_mib * 2**20 // entry:,}"
            r_in = f"{per_in / f16[1]:.4f}" if f16 else ""
            r_past = f"{per_past / f16[2]:.4f}" if f16 and per_past else ""
            past_s = f"{per_past:,.1f}" if per_past is not None else "(no window)"
            print(f"| {t} | {per_in:,.1f} | {r_in} | {past_s} | {r_past} | {block:.4f} | "
                  f"{size / 2**20:,.2f} MiB | {entry / 2**20:,.2f} MiB | {fit} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
