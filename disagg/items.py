"""Items (DESIGN 0.3, "Items: reuse and fan-in"): a room declared as the
parts its caller knows (usually one per image), and the Language rank's
cache of landed items, kept by key for later rooms.

Pure bookkeeping, no I/O: `ItemCache` decides hits, pins and evictions and
holds the rows it was given (copies, so no result the caller holds is ever
aliased); the engine copies a hit's rows into a room's result. Decisions are
deterministic: TP ranks that see the same rooms in the same order (the queue's
lockstep) make the same ones, and `digest()` lets the step's all-reduce catch
ranks that did not.

The rules:
- a hit needs the same key, token count and row geometry; a key seen again
  with another count or geometry is a miss, and its landing replaces the entry;
- an entry a live room uses is pinned (`claim` hits and pins in one step, so a
  hit never races an eviction: an entry is evicted only unpinned, and a key
  evicted before `claim` is simply a miss);
- entries go least recently used first, within `max_bytes`; an item larger
  than the whole cache is not kept.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass

import torch

MAX_KEY_BYTES = 64


@dataclass(frozen=True)
class Item:
    """One item of a room, in prompt order: `num_tokens` rows named by `key` (at
    most 64 bytes, e.g. sha256 of the model id, processor config and image
    bytes; None: never reused), sent by Embedding rank `src_rank` (None: the
    room's)."""

    key: bytes | None
    num_tokens: int
    src_rank: int | None = None

    def __post_init__(self) -> None:
        if self.key is not None and (not isinstance(self.key, bytes)
                                     or not 0 < len(self.key) <= MAX_KEY_BYTES):
            raise ValueError(f"Item.key={self.key!r}: bytes of length 1..{MAX_KEY_BYTES}, "
                             f"or None (never reused)")
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) \
                or self.num_tokens < 1:
            raise ValueError(f"Item.num_tokens={self.num_tokens!r}: an int >= 1")
        if self.src_rank is not None and (isinstance(self.src_rank, bool)
                                          or not isinstance(self.src_rank, int)
                                          or self.src_rank < 0):
            raise ValueError(f"Item.src_rank={self.src_rank!r}: a rank >= 0, or None")


def offsets(items: list[Item]) -> list[int]:
    """Each item's first token in the room."""
    out, at = [], 0
    for it in items:
        out.append(at)
        at += it.num_tokens
    return out


@dataclass
class Entry:
    """A cached item: its rows per buffer name (cache-owned), and who uses it."""

    num_tokens: int
    shape: str  # the rows' geometry (per-token shapes and dtypes), as text
    rows: dict[str, torch.Tensor]
    nbytes: int
    pins: int = 0


def geometry_of(rows: dict[str, torch.Tensor]) -> str:
    """The per-token shape and dtype of every buffer: what a hit must match."""
    return ";".join(f"{name}:{tuple(t.shape[1:])}:{t.dtype}" for name, t in sorted(rows.items()))


class ItemCache:
    """Landed items by key, least recently used first out, within `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[bytes, Entry] = collections.OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.bytes_reused = 0
        self._digest: int | None = None  # `digest()`, until the keys or their order change

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def claim(self, items: list[Item], shape: str) -> list[bool]:
        """Per item, whether it is a hit; every hit is pinned (and most recently
        used) until `release`. Items without a key are misses, uncounted."""
        out = []
        for it in items:
            e = self._entries.get(it.key) if it.key is not None else None
            hit = e is not None and e.num_tokens == it.num_tokens and e.shape == shape
            if hit:
                assert e is not None and it.key is not None
                e.pins += 1
                self._entries.move_to_end(it.key)
                self._digest = None
                self.hits += 1
                self.bytes_reused += e.nbytes
            elif it.key is not None:
                self.misses += 1
            out.append(hit)
        return out

    def rows(self, key: bytes) -> dict[str, torch.Tensor]:
        """A pinned entry's rows (to copy into a result; never hand them out)."""
        e = self._entries[key]
        assert e.pins > 0, "rows of an entry no room pinned"
        return e.rows

    def release(self, items: list[Item], hits: list[bool]) -> None:
        """The room that `claim`ed these is done with its hits."""
        for it, hit in zip(items, hits, strict=True):
            if hit:
                assert it.key is not None
                e = self._entries[it.key]
                e.pins -= 1
                assert e.pins >= 0

    def put(self, key: bytes, rows: dict[str, torch.Tensor]) -> bool:
        """Keep a landed item's rows (copied: the cache owns them). A key held
        with another count or geometry is replaced, unless a room uses it.
        Least recently used unpinned entries go to make room. False: not kept
        (too large, or the space is pinned)."""
        n = next(iter(rows.values())).shape[0]
        shape = geometry_of(rows)
        nbytes = sum(t.numel() * t.element_size() for t in rows.values())
        old = self._entries.get(key)
        if old is not None:
            if old.num_tokens == n and old.shape == shape:
                self._entries.move_to_end(key)
                self._digest = None
                return True  # the same item again: keep the copy we have
            if old.pins:
                return False  # a live room reads it: the new one waits for a later landing
            self._drop(key)
        if nbytes > self.max_bytes:
            return False
        for k in [k for k, e in self._entries.items() if not e.pins]:
            if self.bytes + nbytes <= self.max_bytes:
                break
            self._drop(k)
            self.evictions += 1
        if self.bytes + nbytes > self.max_bytes:
            return False
        self._digest = None
        self._entries[key] = Entry(n, shape, {name: t.clone() for name, t in rows.items()},
                                   nbytes)
        self.bytes += nbytes
        return True

    def _drop(self, key: bytes) -> None:
        self._digest = None
        e = self._entries.pop(key)
        self.bytes -= e.nbytes

    def digest(self) -> int:
        """The cache's keys in LRU order, with their sizes, as a 63-bit number:
        equal on TP ranks whose caches made the same decisions. Read by every
        `step()`: hashed again only after the keys or their order changed."""
        if self._digest is None:
            h = hashlib.blake2b(digest_size=8)
            for k, e in self._entries.items():
                h.update(len(k).to_bytes(1, "little") + k + e.num_tokens.to_bytes(8, "little"))
            self._digest = int.from_bytes(h.digest(), "little") >> 1
        return self._digest
