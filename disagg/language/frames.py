"""Language side: what a frame read from a pair's stream means. Each function
runs on the pair's thread under the engine lock and asks the room's machine:
which allocation the frame answers, whether its meta agrees, where its payload
lands (`Landing`), and what follows once it landed. The stream (`stream.py`)
only posts and completes; a bad frame raises `StreamBroken` here before
anything changes, so the room still holds its blocks.
"""

from __future__ import annotations

import torch

from ..errors import StreamBroken
from ..meta import Meta
from . import timing
from .credit import Credit
from .landing import Job, Landing, ReadingPair, destinations
from .room import RecvRoom


def owed_room(pair: ReadingPair, meta: Meta) -> tuple[RecvRoom, Credit]:
    """The room a frame answers, and the allocation it answers."""
    if pair.m.dead is not None:  # declared dead meanwhile: read nothing more from it
        raise StreamBroken(f"stream from embedding rank {pair.src} already torn down")
    r = pair.engine.rooms.get((pair.src, meta.room))
    credit = pair.engine.machine.owed(r, pair.src, meta)
    assert r is not None
    return r, credit


def abort_arrived(pair: ReadingPair, meta: Meta, reason: str) -> None:
    e = pair.engine
    with pair.cv:
        r, _ = owed_room(pair, meta)
        pair.m.answered()
        e.execute(r, e.machine.abort_frame(r, reason, pair.src))


def data_arrived(pair: ReadingPair, meta: Meta, job: Job | None = None) -> Landing:
    """A DATA meta: check it (a bad one raises `StreamBroken` before anything
    changes, so the room still holds its blocks), then say where it lands:
    where its pre-posted recvs (`job`) already wait, or where to post them."""
    e = pair.engine
    with pair.cv:
        r, a = owed_room(pair, meta)
        chunk = e.machine.check_meta(r, a, meta)
        if job is not None:
            chunk = e.machine.prepost_matches(r, a, chunk, job.room, job.credit,
                                              job.num_tokens, job.token_offset, job.scratch)
        pair.m.answered()
        now = r.last_progress = e.clock()
        lo, hi = e.machine.span(meta.seq_len)
        if meta.first:
            e.credits.learn(hi - lo)  # what this rank allocates for: its span
            rows = e.output_rows(meta.seq_len)
            # (made already when a declared length sized a pre-posted first chunk)
            if r.outputs is None or r.outputs["embeddings"].shape[0] != rows:
                try:
                    e.land_in(r, rows)
                except (RuntimeError, MemoryError) as err:
                    chunk = e.machine.output_failed(r, chunk, err)
        timing.chunk_arrived(e.stats, e.credits, r, hi - lo, now)
        aux = None
        if meta.aux_follows:  # one more tensor, after the payload
            aux = torch.empty(meta.num_aux, dtype=torch.int64, device=e.device)
        if job is not None:
            plan, dsts = job.plan, job.dsts
        else:
            plan, dsts = destinations(e.geometry, e.pool, r, a, chunk.num_tokens,
                                      chunk.token_offset, e.device)
            dsts = dsts if aux is None else [*dsts, aux]
        e.execute(r, e.machine.landing(r, a, meta, chunk))
        return Landing(r, chunk, plan, dsts, not a.direct, pair.m.owed > 0, aux)


def landed(pair: ReadingPair, landing: Landing, seconds: float) -> None:
    e = pair.engine
    with pair.cv:
        e.stats.observe("chunk_transfer_s", seconds)
        e.stats.add(bytes_received=landing.chunk.num_tokens * e.geometry.token_nbytes,
                    chunks=1)
        r = landing.room
        if landing.aux is not None:
            e.machine.aux_landed(r, tuple(landing.aux.tolist()))
        e.execute(r, e.machine.landed(r, pair.m.dead, e.clock()))
        pair.cv.notify_all()
