"""Language side, rooms declared as items: the pure planning. Which items a
caller declared (every source named), which are hits, and per source the
lane: its ALLOC's item table and where each run of its wire rows goes in the
room. `items_room.ItemRoom` runs what this plans."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..items import Item, ItemCache, offsets
from ..wire import MAX_ITEMS_PER_MESSAGE, AllocItem
from .room import RecvRoom


@dataclass
class Lane:
    """One source's share of the room: its item table (as its ALLOC says), and
    where each run of its wire rows goes in the room (lane row, room row, rows)."""

    src: int
    table: tuple[AllocItem, ...]
    runs: list[tuple[int, int, int]]
    state: RecvRoom | None = None  # None: every item of it is a hit (nothing comes)
    in_place: bool = False  # its outputs are views of the room's
    copied: int = 0  # its rows copied into the room's outputs so far
    told: bool = False  # init() sent its ALLOC
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = sum(n for _, _, n in self.runs)


def resolve(items: object, src_rank: int | None) -> list[Item]:
    """The caller's items with every source named; `ValueError` saying what is wrong."""
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"items={items!r}: a non-empty list of disagg.Item")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, Item):
            raise ValueError(f"items[{i}] is a {type(it).__name__}, not a disagg.Item")
        src = it.src_rank if it.src_rank is not None else src_rank
        if src is None:
            raise ValueError(f"items[{i}] names no src_rank and the room has none")
        out.append(Item(it.key, it.num_tokens, src))
    per_source: dict[int | None, int] = {}
    for it in out:
        per_source[it.src_rank] = per_source.get(it.src_rank, 0) + 1
    worst = max(per_source.values())
    if worst > MAX_ITEMS_PER_MESSAGE:
        raise ValueError(f"{worst} items from one source: at most {MAX_ITEMS_PER_MESSAGE} "
                         f"(an ALLOC's item table)")
    return out


def claim(cache: ItemCache | None, lock: threading.Lock, items: list[Item],
          shape: str) -> list[bool]:
    """Which items are hits, each pinned until `release` (all misses: no cache)."""
    if cache is None:
        return [False] * len(items)
    with lock:
        return cache.claim(items, shape)


def lanes_of(items: list[Item], hits: list[bool]) -> dict[int, Lane]:
    """Per source, in order of first appearance: its item table and runs."""
    starts = offsets(items)
    tables: dict[int, list[AllocItem]] = {}
    runs: dict[int, list[tuple[int, int, int]]] = {}
    at: dict[int, int] = {}
    for i, (it, hit, start) in enumerate(zip(items, hits, starts, strict=True)):
        src = it.src_rank
        assert src is not None
        tables.setdefault(src, []).append(AllocItem(i, start, it.num_tokens, not hit))
        rs = runs.setdefault(src, [])
        if hit:
            continue
        w = at.get(src, 0)
        if rs and rs[-1][0] + rs[-1][2] == w and rs[-1][1] + rs[-1][2] == start:
            rs[-1] = (rs[-1][0], rs[-1][1], rs[-1][2] + it.num_tokens)
        else:
            rs.append((w, start, it.num_tokens))
        at[src] = w + it.num_tokens
    return {src: Lane(src, tuple(t), runs[src]) for src, t in tables.items()}


def hit_indices(hits: list[bool]) -> list[int]:
    return [i for i, h in enumerate(hits) if h]
