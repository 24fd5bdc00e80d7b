"""Language side: a room's stage timings, for `ctx.stats()` latencies and the
slow-room log. Observation only: nothing here decides anything."""

from __future__ import annotations

import logging

from ..stats import Stats
from .credit import Credits
from .room import RecvRoom

log = logging.getLogger(__name__)


def chunk_arrived(stats: Stats, credits: Credits, r: RecvRoom, span_tokens: int,
                  now: float) -> None:
    """A DATA meta for `r`: time to its first byte, or the gap a resume cost.
    `span_tokens`: what this rank receives of the room (all of it, or its slice)."""
    if r.first_byte_at is None:
        r.first_byte_at = now
        stats.observe("alloc_to_first_byte_s", now - (r.alloc_at or r.created))
        credits.account_auto(r.auto_first_blocks, span_tokens)
    elif r.partial_at is not None:
        stats.observe("resume_gap_s", now - r.partial_at)
        r.partial_at = None


def room_done(stats: Stats, rank: int, slow_room_s: float | None, r: RecvRoom,
              now: float) -> None:
    """`r` is complete: its total time, and a warning with its stages if slow."""
    total = now - r.created
    stats.observe("recv_total_s", total)
    if slow_room_s is not None and total > slow_room_s:
        waited = (r.alloc_at or r.created) - r.created
        to_first = (r.first_byte_at or now) - (r.alloc_at or r.created)
        log.warning("language rank %d: room %d from embedding rank %d took %.2fs: "
                    "%.3fs waiting for blocks, %.3fs ALLOC -> first byte, %.3fs "
                    "transferring %d tokens in %d chunks (%d resumes)", rank, r.room,
                    r.src_rank, total, waited, to_first, now - (r.first_byte_at or now),
                    r.seq_len, r.chunk_index, r.num_resumes)
