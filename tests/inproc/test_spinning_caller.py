"""In-process layer: callers that spin on `poll()` instead of blocking in
`wait()` (issue 15). A status call that finds nothing final pauses briefly for
a change, so the engine threads get the GIL from a spinning caller. A
regression guard with a generous bound, not a benchmark (that is
`scripts/bench_transfer.py --caller spin`)."""

from __future__ import annotations

import time

import pytest

from disagg.config import DisaggConfig
from disagg.progress import PAUSE_S, PAUSE_WINDOW_S
from disagg.types import TransferStatus

from .fakes import World
from .rooms import mismatches, room_data, send

pytestmark = pytest.mark.timeout(120)

EMB = 0
TERMINAL = (TransferStatus.SUCCESS, TransferStatus.FAILED)


def test_a_spinning_caller_completes_200_small_rooms() -> None:
    cfg = DisaggConfig(hidden_size=64, block_size=16, num_blocks=64, default_alloc_tokens=64)
    with World(cfg, auto_control=True) as w:
        t0 = time.monotonic()
        for room in range(200):
            d = room_data(w.cfg, room, 40)
            s = w.emb().sender(room)
            send(s, d)
            r = w.lang().receiver(room, src_rank=EMB)
            while not r.init():
                pass
            while r.poll() not in TERMINAL:  # spin, as a serving loop's poll would
                pass
            while s.poll() not in TERMINAL:
                pass
            assert r.poll() is TransferStatus.SUCCESS, r.failure
            assert mismatches(r.result(), d) == []
        took = time.monotonic() - t0
        assert took < 60.0, f"200 rooms took {took:.1f}s with spinning callers"
        w.settle_whole()


def test_poll_pauses_at_most_once_per_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep over many live rooms pays the pause once per window, not once per
    room; a room already ended never pauses. The window's clock is held still
    here, so the count is exact."""
    from disagg import progress
    cfg = DisaggConfig(hidden_size=64, block_size=16, num_blocks=64)
    with World(cfg, auto_control=True) as w:
        engine = w.lang()
        rs = [engine.receiver(room, src_rank=EMB) for room in range(64)]
        now = [1000.0]
        monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
        waits = []
        real_wait = engine.cond.wait
        monkeypatch.setattr(engine.cond, "wait",
                            lambda timeout=None: waits.append(timeout) or real_wait(timeout))
        for r in rs:
            assert r.poll() is TransferStatus.BOOTSTRAPPING
        assert waits == [PAUSE_S]  # one pause for the sweep
        now[0] += 2 * PAUSE_WINDOW_S
        rs[0].poll()
        assert len(waits) == 2  # the next window pauses again
        for r in rs:
            r.abort("done")
        now[0] += 2 * PAUSE_WINDOW_S  # a new window: a live room would pause now
        before = len(waits)
        for r in rs:
            assert r.poll() is TransferStatus.FAILED  # ended: no pause
        assert len(waits) == before
        monkeypatch.undo()
        w.settle_whole()
