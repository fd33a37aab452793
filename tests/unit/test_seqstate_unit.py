"""The pure parts of long sessions: the prompt cache, slot file names, the state file's header checks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyllm.errors import SequenceStateError, SlotFilenameError
from pyllm.seqstate import CacheEntry, PromptCache, check_slot_filename, read_state_file_header

SYSTEM = list(range(1000, 1040))          # a 40-token system prompt two conversations share


def _state(n: int, tag: int = 0) -> bytes:
    return bytes([tag % 256]) * n


# ---- PromptCache ----
def test_longest_prefix_returns_the_longest_whole_entry_that_prefixes_the_query():
    c = PromptCache(None)
    c.put([1, 2, 3], _state(10, 1))
    c.put([1, 2, 3, 4, 5], _state(10, 2))
    c.put([1, 2, 9], _state(10, 3))
    n, e = c.longest_prefix([1, 2, 3, 4, 5, 6])
    assert (n, e.tokens, e.state) == (5, [1, 2, 3, 4, 5], _state(10, 2))
    n, e = c.longest_prefix([1, 2, 3, 4])          # [1,2,3,4,5] is longer than the query: not a prefix of it
    assert (n, e.tokens) == (3, [1, 2, 3])
    n, e = c.longest_prefix([1, 2, 3])             # an entry equal to the query is a hit
    assert (n, e.tokens) == (3, [1, 2, 3])
    assert c.longest_prefix([1, 2]) == (0, None)   # shares two tokens with every entry, the whole of none
    assert c.longest_prefix([7]) == (0, None)
    assert c.longest_prefix([]) == (0, None)
    assert (c.hits, c.misses) == (3, 3)


def test_two_conversations_sharing_a_system_prompt_never_get_each_others_entries():
    c = PromptCache(None)
    alice = SYSTEM + [5, 6, 7, 8]
    bob = SYSTEM + [5, 6, 70, 80]                  # the same system prompt, then two shared tokens, then not
    c.put(alice, _state(64, 1), info="alice")
    # Bob shares 42 tokens with Alice's entry, but the entry restores all 44 of her cells: no hit.
    assert c.longest_prefix(bob + [99]) == (0, None)
    c.put(SYSTEM, _state(32, 9), info="system")
    n, e = c.longest_prefix(bob + [99])
    assert (n, e.info) == (len(SYSTEM), "system")  # only the entry that IS the shared part
    c.put(bob, _state(64, 2), info="bob")
    assert c.longest_prefix(bob + [1, 2])[1].info == "bob"
    assert c.longest_prefix(alice + [1, 2])[1].info == "alice"
    assert c.longest_prefix(SYSTEM + [5, 6])[1].info == "system"
    # Token-for-token: a query differing in one token inside the system prompt matches nothing.
    changed = list(SYSTEM)
    changed[20] += 1
    assert c.longest_prefix(changed + [5, 6, 7, 8]) == (0, None)


def test_budget_evicts_least_recently_used_first_and_counts_bytes():
    entry_bytes = 100 + 4 * 3                      # state + 4 bytes per token id
    c = PromptCache(3 * entry_bytes)
    for i in range(3):
        assert c.put([i, i, i], _state(100, i))
    assert c.bytes == 3 * entry_bytes and len(c) == 3
    c.longest_prefix([0, 0, 0, 1])                 # entry 0 becomes the most recently used
    assert c.put([3, 3, 3], _state(100, 3))
    assert [0, 0, 0] in c and [1, 1, 1] not in c   # entry 1 was the least recently used
    assert c.stats() == {"entries": 3, "bytes": 3 * entry_bytes, "budget_bytes": 3 * entry_bytes,
                         "hits": 1, "misses": 0, "evictions": 1}
    assert c.put([4] * 30, _state(100, 4))         # 220 bytes: two entries must go
    assert len(c) == 2 and c.bytes == 220 + entry_bytes and c.evictions == 3
    assert [0, 0, 0] not in c and [3, 3, 3] in c
    assert c.bytes <= c.budget_bytes


def test_an_entry_larger_than_the_budget_is_not_stored_and_evicts_nothing():
    c = PromptCache(1000)
    assert c.put([1], _state(500))
    assert not c.put([2], _state(997))             # 997 + 4 > 1000
    assert [1] in c and [2] not in c and c.bytes == 504 and c.evictions == 0


def test_put_of_the_same_tokens_replaces_the_entry():
    c = PromptCache(None)
    c.put([1, 2], _state(10, 1))
    c.put([1, 2], _state(20, 2))
    assert len(c) == 1 and c.bytes == 20 + 8
    assert c.longest_prefix([1, 2, 3])[1].state == _state(20, 2)


def test_cache_ram_semantics_minus_one_no_limit_zero_off():
    assert PromptCache.from_cache_ram(-1).budget_bytes is None
    assert PromptCache.from_cache_ram(64).budget_bytes == 64 * 2**20
    off = PromptCache.from_cache_ram(0)
    assert not off.enabled and not off.put([1, 2], _state(1))
    assert off.longest_prefix([1, 2]) == (0, None) and off.misses == 1 and len(off) == 0
    for bad in (-2, 1.5, True, "8"):
        with pytest.raises(ValueError):
            PromptCache.from_cache_ram(bad)


def test_bad_arguments_are_refused():
    c = PromptCache(None)
    with pytest.raises(ValueError, match="0 tokens"):
        c.put([], _state(1))
    with pytest.raises(ValueError, match="non-empty bytes"):
        c.put([1], b"")
    with pytest.raises(ValueError, match="non-empty bytes"):
        c.put([1], "text")
    with pytest.raises(ValueError, match="int token ids"):
        c.put(["a"], _state(1))
    with pytest.raises(ValueError, match="budget_bytes"):
        PromptCache(-5)


def test_pop_clear_and_entry_fields():
    c = PromptCache(None)
    c.put([5, 6, 7], bytearray(b"abc"), info={"type_k": "q8_0"})
    e = c.pop([5, 6, 7])
    assert isinstance(e, CacheEntry) and e.tokens == [5, 6, 7] and e.n_tokens == 3 and e.state == b"abc"
    assert e.n_bytes == 3 + 12 and e.info == {"type_k": "q8_0"}
    assert c.pop([5, 6, 7]) is None and c.bytes == 0
    c.put([1], b"x")
    c.clear()
    assert len(c) == 0 and c.bytes == 0


# ---- slot file names ----
@pytest.mark.parametrize("name", ["chat1.bin", "slot 0.state", "été-ü.bin", "a.b.c", ".hidden", "x" * 255,
                                  "日本語.bin"])
def test_plain_file_names_are_accepted(tmp_path, name):
    assert check_slot_filename(name, tmp_path) == tmp_path.resolve() / name


@pytest.mark.parametrize("name, why", [
    ("", "is empty"), ("a/b", "separator"), ("a\\b", "separator"), ("../x", "forbidden"), ("..", "'..'"),
    ("a..b", "'..'"), (".", "ends with '.'"), ("x.", "ends with '.'"), (" x", "space"), ("x ", "space"),
    ("/etc/passwd", "separator"), ("a:b", "forbidden"), ("a*b", "forbidden"), ("a?b", "forbidden"),
    ('a"b', "forbidden"), ("a<b", "forbidden"), ("a>b", "forbidden"), ("a|b", "forbidden"),
    ("a\x00b", "control"), ("a\nb", "control"), ("a\x7fb", "control"), ("a\x85b", "control"),
    ("a\uff0eb", "forbidden"), ("a\u2215b", "forbidden"), ("a\u2216b", "forbidden"), ("a\ufffdb", "forbidden"),
    ("\ufeffa", "forbidden"), ("a\ud800b", "surrogate"), ("é" * 128, "longer than 255 bytes"),
])
def test_names_llama_cpp_refuses_are_refused(tmp_path, name, why):
    with pytest.raises(SlotFilenameError, match=why):
        check_slot_filename(name, tmp_path)


@pytest.mark.parametrize("value", [None, 5, b"a.bin", ["a"]])
def test_a_filename_must_be_a_string(tmp_path, value):
    with pytest.raises(SlotFilenameError, match="not a string"):
        check_slot_filename(value, tmp_path)


def test_a_symlink_leading_out_of_the_directory_is_refused(tmp_path):
    inside, outside = tmp_path / "slots", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    (inside / "escape.bin").symlink_to(outside / "target.bin")
    with pytest.raises(SlotFilenameError, match="outside the slot save directory"):
        check_slot_filename("escape.bin", inside)
    os.symlink(inside, tmp_path / "link")              # the directory itself through a link is fine
    assert check_slot_filename("ok.bin", tmp_path / "link") == inside.resolve() / "ok.bin"


def test_the_directory_must_exist(tmp_path):
    with pytest.raises(SlotFilenameError, match="not a directory"):
        check_slot_filename("a.bin", tmp_path / "missing")


# ---- a file that is not a state file is refused by its header alone ----
@pytest.mark.parametrize("content, why", [
    (b"", "empty"), (b"PYLLMSE", "truncated"), (b"GGUF" + bytes(12), "not a pyllm state file"),
    (b"PYLLMSEQ" + (1).to_bytes(4, "little") + (2**30).to_bytes(4, "little"), "header length"),
    (b"PYLLMSEQ" + (1).to_bytes(4, "little") + (10).to_bytes(4, "little") + b"{}", "truncated inside its header"),
    (b"PYLLMSEQ" + (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + b"{}" + bytes(32), "checksum"),
])
def test_not_a_state_file(tmp_path, content, why):
    p = tmp_path / "f.bin"
    p.write_bytes(content)
    with pytest.raises(SequenceStateError, match=why):
        read_state_file_header(p)


def test_a_missing_state_file_is_a_sequence_state_error(tmp_path):
    with pytest.raises(SequenceStateError, match="No such file"):
        read_state_file_header(tmp_path / "nope.bin")
