"""The item cache's rules (DESIGN 0.3), pure: hits, pins, evictions, replacement,
no aliasing, determinism across TP ranks, and `Item`'s validation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disagg.items import Item, ItemCache, geometry_of, offsets

HIDDEN = 4


def rows(n: int, fill: float = 1.0, hidden: int = HIDDEN) -> dict[str, torch.Tensor]:
    return {"embeddings": torch.full((n, hidden), fill, dtype=torch.bfloat16),
            "ids": torch.zeros((n, 4), dtype=torch.int32)}


SHAPE = geometry_of(rows(1))
ROW_BYTES = HIDDEN * 2 + 16  # one token: bf16 embeddings + the packed int32 ids


def test_a_landed_item_is_a_hit_for_the_same_key_count_and_geometry_only() -> None:
    c = ItemCache(1 << 20)
    assert c.claim([Item(b"a", 3)], SHAPE) == [False]  # nothing landed yet
    assert c.put(b"a", rows(3))
    assert c.claim([Item(b"a", 3), Item(b"a", 4), Item(None, 3), Item(b"b", 3)], SHAPE) == [
        True, False, False, False]
    assert c.claim([Item(b"a", 3)], geometry_of(rows(1, hidden=8))) == [False]  # geometry
    assert (c.hits, c.misses) == (1, 4)  # a keyless item is no miss
    assert c.bytes_reused == 3 * ROW_BYTES


def test_a_hit_copies_rows_the_cache_owns_never_the_callers() -> None:
    c = ItemCache(1 << 20)
    src = rows(2, 5.0)
    c.put(b"a", src)
    src["embeddings"].fill_(-1.0)  # the caller reuses its result's memory
    [hit] = c.claim([Item(b"a", 2)], SHAPE)
    assert hit and torch.equal(c.rows(b"a")["embeddings"], rows(2, 5.0)["embeddings"])


def test_least_recently_used_goes_first_and_a_pinned_entry_never() -> None:
    c = ItemCache(3 * 2 * ROW_BYTES)  # three 2-token items
    for k in (b"a", b"b", b"c"):
        assert c.put(k, rows(2))
    hits = c.claim([Item(b"a", 2)], SHAPE)  # a: pinned, and most recently used
    assert c.put(b"d", rows(2)) and b"b" not in c and c.evictions == 1  # b was the oldest
    assert c.put(b"e", rows(2)) and b"c" not in c
    assert c.put(b"f", rows(2)) and b"d" not in c and b"a" in c  # a pinned: d goes instead
    c.release([Item(b"a", 2)], hits)
    assert c.put(b"g", rows(2)) and b"a" not in c  # unpinned, and the oldest now
    assert c.bytes <= c.max_bytes


def test_a_hit_racing_an_eviction_is_a_miss_never_an_error() -> None:
    c = ItemCache(2 * ROW_BYTES)
    c.put(b"a", rows(2))
    c.put(b"b", rows(2))  # evicts a before any room claimed it
    assert c.claim([Item(b"a", 2)], SHAPE) == [False]
    with pytest.raises(KeyError):
        c.rows(b"a")


def test_when_every_byte_is_pinned_a_landing_is_not_kept() -> None:
    c = ItemCache(2 * ROW_BYTES)
    c.put(b"a", rows(2))
    hits = c.claim([Item(b"a", 2)], SHAPE)
    assert not c.put(b"b", rows(2)) and b"a" in c
    assert not c.put(b"big", rows(3))  # larger than the whole cache
    c.release([Item(b"a", 2)], hits)
    assert c.put(b"b", rows(2)) and b"a" not in c


def test_a_key_seen_with_another_count_is_replaced_unless_a_room_reads_it() -> None:
    c = ItemCache(1 << 20)
    c.put(b"a", rows(2))
    hits = c.claim([Item(b"a", 2)], SHAPE)
    assert not c.put(b"a", rows(3))  # a live room reads the 2-token entry
    assert c.rows(b"a")["embeddings"].shape[0] == 2
    c.release([Item(b"a", 2)], hits)
    assert c.put(b"a", rows(3, 7.0))
    assert c.claim([Item(b"a", 3)], SHAPE) == [True] and c.bytes == 3 * ROW_BYTES


def test_item_validation_and_offsets() -> None:
    for bad in ({"key": b"", "num_tokens": 1}, {"key": b"x" * 65, "num_tokens": 1},
                {"key": "text", "num_tokens": 1}, {"key": None, "num_tokens": 0},
                {"key": None, "num_tokens": True}, {"key": None, "num_tokens": 1, "src_rank": -1}):
        with pytest.raises(ValueError):
            Item(**bad)  # type: ignore[arg-type]
    assert offsets([Item(None, 3), Item(b"k", 5), Item(None, 1)]) == [0, 3, 8]


OPS = st.lists(st.tuples(st.sampled_from(["put", "claim", "release"]),
                         st.integers(0, 5), st.integers(1, 4)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_same_rooms_in_the_same_order_make_the_same_cache(ops: list) -> None:
    """Two TP ranks' caches fed the same sequence agree (the digest the step's
    all-reduce compares); bytes stay within the bound; a pinned entry is never
    gone; a diverging rank shows in the digest."""
    a, b = ItemCache(6 * ROW_BYTES), ItemCache(6 * ROW_BYTES)
    pinned: list[tuple[list[Item], list[bool]]] = []
    for op, k, n in ops:
        key = bytes([k + 1])
        for c in (a, b):
            if op == "put":
                c.put(key, rows(n))
        if op == "claim":
            items = [Item(key, n)]
            ha, hb = a.claim(items, SHAPE), b.claim(items, SHAPE)
            assert ha == hb
            pinned.append((items, ha))
        elif op == "release" and pinned:
            items, hits = pinned.pop(0)
            a.release(items, hits)
            b.release(items, hits)
        assert a.digest() == b.digest() and a.bytes <= a.max_bytes
        fresh = ItemCache(0)
        fresh._entries = a._entries  # hashed anew: the remembered digest is current
        assert a.digest() == fresh.digest()
        for items, hits in pinned:
            for it, hit in zip(items, hits, strict=True):
                assert not hit or (it.key in a and it.key in b)
    b.put(b"\xff", rows(1))  # one rank alone
    assert a.digest() != b.digest() or b"\xff" in a
