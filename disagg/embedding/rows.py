"""Embedding side, rooms declared as items (DESIGN 0.3): which of the rows a
caller gives are sent. Pure.

A source's ALLOC carries its item table: the items it sends, in room order,
and which of them the Language instance lacks (the others are cache hits).
The wire carries only the needed items' rows, back to back ("wire tokens").
A caller that asked `needed()` before its first `send()` gives exactly those
rows; one that did not gives all of this source's items' rows ("caller
tokens"), and `RowMap` picks the needed ones out of each part as views (no
copy), so the stream and the plan never see the difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..wire import AllocItem


def needed_tokens(items: tuple[AllocItem, ...]) -> int:
    """Wire tokens of a source: its needed items' rows."""
    return sum(it.num_tokens for it in items if it.needed)


def item_tokens(items: tuple[AllocItem, ...]) -> int:
    """Caller tokens of a source that did not ask: all of its items' rows."""
    return sum(it.num_tokens for it in items)


def needed_indices(items: tuple[AllocItem, ...]) -> list[int]:
    return [it.index for it in items if it.needed]


def pieces(items: tuple[AllocItem, ...], start: int, n: int) -> list[tuple[int, int]]:
    """The needed runs of caller tokens [start, start + n), as (offset in the
    part, tokens), in order; neighbouring needed items join into one run."""
    out: list[tuple[int, int]] = []
    at = 0  # caller token where the item starts
    for it in items:
        lo, hi = max(at, start), min(at + it.num_tokens, start + n)
        if it.needed and lo < hi:
            if out and out[-1][0] + out[-1][1] == lo - start:
                out[-1] = (out[-1][0], out[-1][1] + hi - lo)
            else:
                out.append((lo - start, hi - lo))
        at += it.num_tokens
    return out


@dataclass
class RowMap:
    """A caller that gives all of its items' rows: how many it gave, of how many."""

    items: tuple[AllocItem, ...]
    total: int  # caller tokens: every item of this source
    given: int = 0

    def select(self, sources: list[torch.Tensor], n: int) -> list[tuple[list[torch.Tensor], int]]:
        """The needed rows of the caller's next part of `n` rows (each tensor
        [n, ...], wire order): views, one list per run."""
        out = [([t.narrow(0, off, k) for t in sources], k)
               for off, k in pieces(self.items, self.given, n)]
        self.given += n
        return out
