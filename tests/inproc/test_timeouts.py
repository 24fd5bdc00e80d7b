"""In-process layer: bootstrap_timeout, on the injected clock.

No test here waits for real time to pass: the clock is advanced by the test,
in steps, with every engine's `on_tick` and every control message (heartbeats
included, so no peer is declared dead) after each step. A room that waits
too long for its ALLOC, its data, its blocks, its RESUME or an ALLOC from
another TP rank fails, on the side that waits, with a reason naming the
timeout, and not a moment before; every block and the budget come back, and
what the other side still held for the room is answered and freed.
"""

from __future__ import annotations

from typing import Any

import pytest

from disagg import wire
from disagg.config import DisaggConfig
from disagg.types import TransferStatus

from .fakes import TERMINAL, World
from .rooms import mismatches, room_data, send

pytestmark = pytest.mark.timeout(60)

SUCCESS, FAILED = TransferStatus.SUCCESS, TransferStatus.FAILED
BOOT = 20.0
PEER = 4.0
BS = 16
POOL = 8
EMB, LANG = 0, 1


def cfg(**kw: Any) -> DisaggConfig:
    return DisaggConfig(hidden_size=32, block_size=BS, num_blocks=POOL,
                        default_alloc_tokens=POOL * BS, recv_into="pool", auto_resume=False,
                        bootstrap_timeout=BOOT, peer_timeout=PEER).replace(**kw)


def world(**kw: Any) -> World:
    return World(cfg(**kw), embedding_blocks=64)


def test_data_without_alloc() -> None:
    """send() and no ALLOC: the sender fails after bootstrap_timeout (not
    before) and gives its budget back; an ALLOC that comes later is refused
    and its blocks come back."""
    with world() as w:
        s = w.emb().sender(1)
        send(s, room_data(w.cfg, 1, 50))
        w.advance(BOOT * 0.9)
        assert s.poll() not in TERMINAL
        w.advance(BOOT * 0.2)
        assert s.poll() is FAILED
        assert s.failure is not None and "waiting for ALLOC" in s.failure, s.failure
        assert f"{BOOT:g}s" in s.failure
        assert w.causes(EMB) == {"timeout": 1}
        w.assert_whole("after the sender timed out")
        r = w.lang().receiver(1, src_rank=EMB)
        assert r.init()
        assert w.ended(r, "the late ALLOC") is FAILED
        assert r.failure is not None and "waiting for ALLOC" in r.failure, r.failure
        w.settle_whole("after the late ALLOC was refused")


def test_alloc_without_sender() -> None:
    """An ALLOC that no sender ever takes is dropped after bootstrap_timeout:
    its ABORT frame frees the Language rank's blocks."""
    with world() as w:
        r = w.lang().receiver(2, src_rank=EMB)
        assert r.init()
        w.deliver_all()
        w.advance(BOOT * 0.9)
        assert r.poll() is TransferStatus.WAITING_FOR_INPUT
        w.advance(BOOT * 0.2)
        assert w.ended(r, "the dropped ALLOC") is FAILED
        assert r.failure is not None and "bootstrap_timeout" in r.failure, r.failure
        assert w.causes(LANG) == {"aborted_by_peer": 1}
        w.settle_whole("after the ALLOC was dropped")


@pytest.mark.parametrize("with_alloc", [True, False], ids=["alloc_waiting", "no_alloc"])
def test_sender_without_data(with_alloc: bool) -> None:
    """Issue 14: a sender() whose send() never comes fails at bootstrap_timeout,
    answering the ALLOC it holds, so the Language rank's blocks come back."""
    w = world()
    try:
        s = w.emb().sender(3)
        r = w.lang().receiver(3, src_rank=EMB)
        if with_alloc:
            assert r.init()
            w.deliver_all()
        w.advance(BOOT * 1.1)  # bootstrap_timeout, not yet bootstrap + peer timeouts
        # FAILED once the ABORT frame that answers the waiting ALLOC has left
        assert w.ended(s, "the sender") is FAILED, f"no data for {BOOT * 1.1:g}s"
        assert s.failure is not None and "send()" in s.failure, s.failure
        if with_alloc:
            assert w.ended(r, "the ALLOC answered") is FAILED
        w.settle_whole("after the sender timed out")
    finally:
        w.close()


def test_alloc_at_a_sender_that_never_sends_fails_on_the_language_rank() -> None:
    """Whatever the Embedding side does with such a room, the Language rank
    gives up after bootstrap_timeout + peer_timeout, tells the Embedding rank
    (ABORT), and keeps its blocks until a frame answers the ALLOC."""
    with world() as w:
        s = w.emb().sender(4)
        r = w.lang().receiver(4, src_rank=EMB)
        assert r.init()
        w.deliver_all()
        w.link().gate()
        w.advance(BOOT + PEER + 1.0)
        assert w.ended(r, "the Language rank gives up") is FAILED
        assert r.failure is not None and "no first chunk" in r.failure, r.failure
        assert w.lang().pool.allocator.num_free == 0, "blocks freed before the ALLOC was answered"
        w.link().open()
        assert w.ended(s, "the sender fails") is FAILED
        w.settle_whole("after the ABORT frame")
        assert w.causes(LANG) == {"timeout": 1}


def test_no_free_blocks_within_bootstrap_timeout() -> None:
    """Room X holds the whole pool (its chunk held on the wire); room Y cannot
    get a block and fails after bootstrap_timeout; X is unharmed."""
    with world() as w:
        dx = room_data(w.cfg, 5, POOL * BS)
        sx = w.emb().sender(5)
        send(sx, dx)
        w.link().gate()
        x = w.lang().receiver(5, src_rank=EMB)
        assert x.init()
        w.deliver_all()
        w.link().wait_frames(1)
        y = w.lang().receiver(6, src_rank=EMB)
        assert not y.init()
        w.advance(BOOT * 0.9)
        assert y.poll() is TransferStatus.BOOTSTRAPPING
        w.advance(BOOT * 0.2)
        assert y.poll() is FAILED
        assert y.failure is not None and "no free blocks" in y.failure, y.failure
        assert x.poll() is TransferStatus.WAITING_FOR_INPUT
        w.link().open()
        assert w.finish(x, "room X") is SUCCESS, x.failure
        assert mismatches(x.result(), dx) == []
        assert w.ended(sx, "sender X") is SUCCESS
        assert w.causes(LANG) == {"timeout": 1}
        w.settle_whole()


def test_waiting_for_resume() -> None:
    """A partly landed room whose caller never resumes fails on both sides after
    bootstrap_timeout; the ABORT and REJECT that cross are harmless."""
    with world() as w:
        s = w.emb().sender(7)
        send(s, room_data(w.cfg, 7, 3 * POOL * BS))
        r = w.lang().receiver(7, src_rank=EMB)
        assert r.init()
        # both ends done with chunk 0 (the sender's completion is its last progress)
        # before the clock moves, so both measure from the same moment
        w.run_until(lambda: r.needs_resume and w.counter(EMB, "chunks") == 1, "chunk 0 landed")
        w.advance(BOOT * 0.9)
        assert r.needs_resume and s.poll() not in TERMINAL
        w.advance(BOOT * 0.2)
        assert (w.ended(s, "sender"), w.ended(r, "receiver")) == (FAILED, FAILED)
        assert s.failure is not None and "waiting for RESUME" in s.failure, s.failure
        assert r.failure is not None and f"{BOOT:g}s" in r.failure, r.failure
        assert w.causes(EMB) == w.causes(LANG) == {"timeout": 1}
        w.settle_whole()


def test_tp_rank_that_never_asks() -> None:
    """A TP-2 instance where only rank 1 asks for the room: rank 1 gets all of
    it, but the sender is not SUCCESS (rank 2 has nothing) and fails after
    bootstrap_timeout, saying it waited for an ALLOC from one more rank."""
    with World(cfg(language_tp_size=2), embedding_blocks=64) as w:
        d = room_data(w.cfg, 8, 100)
        s = w.emb().sender(8)
        send(s, d)
        r1 = w.lang(1).receiver(8, src_rank=EMB)
        assert r1.init()
        assert w.finish(r1, "TP rank 1") is SUCCESS
        assert mismatches(r1.result(), d) == []
        w.run_until(lambda: w.counter(EMB, "chunks") == 1, "the sender saw its chunk complete")
        w.advance(BOOT * 0.9)
        assert s.poll() not in TERMINAL
        w.advance(BOOT * 0.2)
        assert s.poll() is FAILED
        assert s.failure is not None and "ALLOC from 1 more rank" in s.failure, s.failure
        assert w.causes(EMB) == {"timeout": 1}
        w.settle_whole()
        assert [e for e in w.control.delivered if isinstance(e.msg, wire.Alloc)] != []
