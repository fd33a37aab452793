"""Feed llama.cpp truncated and corrupted sequence states; run as a script, so an abort ends only this process.

    python tests/integration/seq_state_fuzz.py MODEL.gguf TYPE_K TYPE_V [SEED]

The state is parsed with llama.cpp's layout (llama-kv-cache.cpp state_write: per cache, the stream count, then
per stream the cell count, each cell's position and sequence ids, the V transposition flag, the layer count,
then per layer a type and a row size before the rows), so every byte that is not K/V data is corrupted in
turn (set to 0x00, 0xff and a random value; 32-bit fields also to extreme values) and the state is cut at each
of them; K/V data bytes get a random sample. Prints one JSON line of counts: restores tried, refused (by pyllm's
checks or by llama.cpp), accepted. After every accepted state it decodes one more token into that sequence, so a
state that loads but leaves the cache inconsistent fails here too; after every refusal by llama.cpp it checks
the sequence is empty. Exits 0 when every call returned (tests/integration/test_seq_state.py checks the exit
status and the counts). Models whose cells carry an extension (M-RoPE) are not supported by the parser.
"""
from __future__ import annotations

import json
import random
import struct
import sys

from pyllm.context import Context
from pyllm.errors import SequenceStateError
from pyllm.model import Model


def structure(buf: bytes, n_caches: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(structural ranges, data ranges) of a sequence state, as [start, end) byte offsets."""
    meta, data = [(0, 8)], []
    off = 8

    def field(size: int) -> int:
        nonlocal off
        meta.append((off, off + size))
        value = int.from_bytes(buf[off:off + size], "little")
        off += size
        return value

    for _ in range(n_caches):
        n_stream = field(4)
        for _ in range(n_stream):
            cells = field(4)
            if cells == 0:
                continue
            for _ in range(cells):
                field(4)                              # position
                n_seq = field(4)
                for _ in range(n_seq):
                    field(4)                          # sequence id
            v_trans = field(4)
            n_layer = field(4)
            for _ in range(n_layer):                  # K: type, row size, rows
                field(4)
                row = field(8)
                data.append((off, off + cells * row))
                off += cells * row
            for _ in range(n_layer):                  # V
                field(4)
                if v_trans:
                    el, n_embd = field(4), field(4)
                    size = cells * el * n_embd
                else:
                    size = cells * field(8)
                data.append((off, off + size))
                off += size
    assert off == len(buf), f"parsed {off} of {len(buf)} bytes: not the layout this script knows"
    return meta, data


def main(path: str, type_k: str, type_v: str, seed: int = 0) -> int:
    rng = random.Random(seed)
    counts = {"tried": 0, "refused": 0, "refused_by_llama": 0, "accepted": 0, "accepted_decoded": 0}
    with Model(path) as model, Context(model, n_ctx=512, n_batch=512, n_seq_max=2, type_k=type_k,
                                       type_v=type_v) as ctx:
        prompt = model.tokenize("The quick brown fox jumps over the lazy dog. " * 2)
        ctx.decode(prompt)
        good = ctx.seq_state_get(0)
        n_caches = 2 if model.n_swa > 0 else 1
        meta, data = structure(good, n_caches)
        n_good = len(prompt)

        def attempt(bad: bytes, what: str) -> None:
            counts["tried"] += 1
            assert ctx.seq_state_set(good, 0) == n_good   # a sequence to lose, restored the fast way
            try:
                n = ctx.seq_state_set(bad, 0)
            except SequenceStateError as exc:
                counts["refused"] += 1
                if "now empty" in str(exc):  # llama.cpp refused it; pyllm empties the sequence
                    counts["refused_by_llama"] += 1
                    assert (ctx.seq_pos_range(0), ctx.n_past) == ((-1, -1), 0), \
                        f"{what}: refused, the sequence must be empty: {ctx.seq_pos_range(0)} {ctx.n_past} {exc}"
                else:                        # refused by pyllm's checks before C: the sequence is untouched
                    assert (ctx.seq_pos_range(0), ctx.n_past) == ((0, n_good - 1), n_good), f"{what}: {exc}"
                return
            counts["accepted"] += 1
            if n < 500:                      # one more token where the restored state says the sequence ends
                ctx.decode([prompt[2]])
                counts["accepted_decoded"] += 1

        meta_offsets = sorted({o for a, b in meta for o in range(a, b)})
        data_offsets = sorted({rng.randrange(a, b) for a, b in data if b > a for _ in range(8)})
        for cut in sorted(set(meta_offsets) | {a for a, _ in data} | set(data_offsets) | {len(good) - 1}):
            attempt(good[:cut], f"cut at {cut}")
        for off in meta_offsets + data_offsets:
            for value in (0x00, 0xFF, rng.randrange(256)):
                if good[off] != value:
                    attempt(good[:off] + bytes([value]) + good[off + 1:], f"byte {off} = {value}")
        for a, b in meta:
            for value in (0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 20, n_good + 5, 255, 256):
                if b - a >= 4:
                    attempt(good[:a] + struct.pack("<I", value) + good[a + 4:], f"u32 at {a} = {value}")
        attempt(good + b"\0", "a trailing byte")
        attempt(good + good, "twice")
        ctx.decode(prompt[:3])
        grown = ctx.seq_state_get(0)         # a state of more cells, cut at the other's length
        attempt(grown[:len(good)], "a longer state cut")
    print(json.dumps({"state_bytes": len(good), "meta_bytes": len(meta_offsets), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 0))
