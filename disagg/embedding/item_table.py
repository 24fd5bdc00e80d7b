"""Embedding side, rooms declared as items (DESIGN 0.3): the item table a
room's ALLOCs declare for this source. The first sets it; every other rank's
must be the same; rows the caller gave before it came are re-cut to the
needed ones (`rows.RowMap`)."""

from __future__ import annotations

from ..errors import FailureCause
from .room import Grant, SendRoom, add_runs
from .rows import RowMap, item_tokens, needed_tokens


def take_items(r: SendRoom, lang: int, grant: Grant) -> tuple[str, FailureCause] | None:
    """Rank `lang`'s ALLOC and the room's item table: what is wrong, and its
    cause, or None (the table set, and any rows given re-cut)."""
    first = not r.lanes and r.items is None
    if not first and grant.items != r.items:
        return (f"language rank {lang}'s ALLOC declares "
                f"{'no' if grant.items is None else len(grant.items)} item(s), other "
                f"ranks of its instance {'none' if r.items is None else len(r.items)}, or "
                f"other ones (TP ranks disagree on the room's items or their hits)",
                FailureCause.BAD_MESSAGE)
    if not first or grant.items is None:
        return None
    r.items = grant.items
    if r.sources is None:
        return None
    if r.aux:
        return (f"room {r.room} is declared as items but send() gave aux values: a room "
                f"with items carries no aux", FailureCause.LENGTH_MISMATCH)
    if r.seq_len != item_tokens(r.items):
        return (f"room {r.room}'s items from this rank hold {item_tokens(r.items)} "
                f"tokens, but send() gave {r.seq_len}", FailureCause.LENGTH_MISMATCH)
    rows = r.rows = RowMap(r.items, r.seq_len)
    parts, r.parts, r.given = r.parts, [], 0
    for p in parts:
        add_runs(r, rows.select(p.sources, p.num_tokens), p.ready)
    r.seq_len = needed_tokens(r.items)
    return None
