"""A minimal Language-side serving loop on the raw Receiver API.

Each scheduler iteration (every 20 ms, like a forward step) it admits new rooms
while the pool has blocks (`init` returns False otherwise: retry next time),
resumes rooms that could not resume by themselves (only when blocks were short:
with auto_resume the receiver thread resumes on its own), and hands finished
rooms to the model. With tensor parallelism, use `ctx.language.queue()`
instead: it makes every TP rank agree on every decision.
"""

from __future__ import annotations

import collections
import time

import disagg
from disagg import TransferStatus

TICK_S = 0.02


def run(ctx: disagg.Context, rooms: list[int], timeout_s: float) -> int:
    pending = collections.deque(rooms)
    active: dict[int, disagg.Receiver] = {}
    done = failed = tokens = 0
    deadline = time.monotonic() + timeout_s
    while pending or active:
        if time.monotonic() > deadline:
            print(f"[language {ctx.rank}] timed out")
            return 1
        while pending:  # FIFO admission
            room = pending[0]
            r = active.get(room) or ctx.language.receiver(room, src_rank=0)
            active[room] = r
            if not r.init():
                break  # no free blocks now; this room keeps its place in line
            pending.popleft()
        for room, r in list(active.items()):
            if r.needs_resume:
                r.resume()
            status = r.poll()
            if status == TransferStatus.SUCCESS:
                res = r.result()
                assert res.aux == (room,)
                tokens += res.embeddings.shape[0]  # prefill(res) would run here
                done += 1
                del active[room]
            elif status == TransferStatus.FAILED:
                print(f"[language {ctx.rank}] room {room} failed: {r.failure}")
                failed += 1
                del active[room]
        time.sleep(TICK_S)
    print(f"[language {ctx.rank}] received {done} rooms ({tokens} tokens), {failed} failed")
    return 1 if failed else 0
