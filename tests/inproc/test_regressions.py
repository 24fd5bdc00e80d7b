"""In-process layer: the correctness bugs reproduced against 0.1 (issue 14),
one test named for each, driven exactly (no real time, no sleeps). Each
failed before its fix. Bugs whose trigger is a real Gloo timeout or real
sockets are in `tests/test_regressions.py`; the abort races of bug 2 are
`test_abort.py::test_*_abort_racing_the_last_chunk_that_completes`.
"""

from __future__ import annotations

from typing import Any

import pytest

from disagg import wire
from disagg.config import DisaggConfig
from disagg.types import TransferStatus

from .fakes import World
from .rooms import mismatches, receive, room_data, send

pytestmark = pytest.mark.timeout(60)

SUCCESS, FAILED = TransferStatus.SUCCESS, TransferStatus.FAILED
BS, EMB, LANG = 16, 0, 1


def cfg(**kw: Any) -> DisaggConfig:
    return DisaggConfig(hidden_size=32, block_size=BS, num_blocks=16,
                        default_alloc_tokens=3 * BS, bootstrap_timeout=20.0,
                        peer_timeout=4.0).replace(**kw)


def one_room(w: World, room: int, seq: int, *, lang: int = LANG) -> None:
    """An ordinary room, sender first: SUCCESS on both sides, bit-exact."""
    r, d = receive(w, room, seq, lang)
    assert mismatches(r.result(), d) == []


def test_room_id_reused_when_the_new_alloc_comes_before_the_new_sender() -> None:
    """Bug 3: an id whose room ended on every rank may be reused in either order;
    the new room's ALLOC used to be refused as "a room that already ended"."""
    with World(cfg()) as w:
        one_room(w, 5, 40)
        d = room_data(w.cfg, 5, 70)
        r = w.lang().receiver(5, src_rank=EMB)
        assert r.init()
        w.deliver_all()  # the ALLOC is here before the new sender
        assert w.emb().lobby.holds(5, LANG)
        s = w.emb().sender(5)
        send(s, d)
        assert w.finish(r, "the reused room") is SUCCESS, r.failure
        assert w.ended(s, "its sender") is SUCCESS, s.failure
        assert mismatches(r.result(), d) == []
        w.settle_whole()


def test_room_id_retried_after_a_late_alloc_was_refused() -> None:
    """Bug 3, the retry: a room aborted on the Embedding side before any ALLOC;
    the Language rank's late ALLOC is refused (its room ended), and the same id
    retried by that rank is a new room, not refused again."""
    with World(cfg()) as w:
        old = w.emb().sender(6)
        old.abort("encoder failed")
        assert old.poll() is FAILED
        late = w.lang().receiver(6, src_rank=EMB)
        assert late.init()
        assert w.ended(late, "the late ALLOC") is FAILED
        assert late.failure is not None and "already ended" in late.failure, late.failure
        d = room_data(w.cfg, 6, 30)
        retry = w.lang().receiver(6, src_rank=EMB)
        assert retry.init()
        w.deliver_all()
        s = w.emb().sender(6)
        send(s, d)
        assert w.finish(retry, "the retried room") is SUCCESS, retry.failure
        assert w.ended(s, "its sender") is SUCCESS
        assert mismatches(retry.result(), d) == []
        w.settle_whole()


def test_tp_rank_abort_before_its_alloc_answers_the_other_ranks_alloc() -> None:
    """Bug 4: TP 2, bare receivers; rank 2's ALLOC waits at the Embedding rank (no
    sender yet) when rank 1 aborts before its own ALLOC. Rank 2's ALLOC is
    answered at once (an ABORT frame with rank 1's reason), not after
    bootstrap_timeout; the sender made later starts FAILED."""
    with World(cfg(language_tp_size=2)) as w:
        r2 = w.lang(2).receiver(7, src_rank=EMB)
        assert r2.init()
        w.deliver_all()
        assert w.emb().lobby.holds(7, 2)
        r1 = w.lang(1).receiver(7, src_rank=EMB)
        r1.abort("request cancelled")
        assert w.ended(r2, "rank 2's room") is FAILED  # the clock never moved
        assert r2.failure is not None and "request cancelled" in r2.failure, r2.failure
        assert r1.poll() is FAILED
        s = w.emb().sender(7)
        assert s.poll() is FAILED and "request cancelled" in (s.failure or "")
        w.settle_whole()
        one_room_tp2(w, 8)


def one_room_tp2(w: World, room: int) -> None:
    d = room_data(w.cfg, room, 50)
    s = w.emb().sender(room)
    send(s, d)
    rs = [w.lang(rank).receiver(room, src_rank=EMB) for rank in (1, 2)]
    for r in rs:
        assert r.init()
    for r in rs:
        assert w.finish(r, f"room {room}") is SUCCESS, r.failure
        assert mismatches(r.result(), d) == []
    assert w.ended(s, "sender") is SUCCESS


def test_frame_disagreeing_with_its_allocation_returns_the_rooms_blocks() -> None:
    """Bug 6: a DATA frame whose size disagrees with the allocation it answers
    breaks the stream; the pair is torn down on both sides (bug 1: the
    Embedding rank is told why, by PAIR_DOWN) and the room's blocks come back.
    They used to leak: the allocation was dropped before the size check."""
    with World(cfg(recv_into="pool")) as w:
        d = room_data(w.cfg, 9, 100)
        r = w.lang().receiver(9, src_rank=EMB)
        assert r.init()  # 3 blocks
        (env,) = w.control.drop(lambda e: isinstance(e.msg, wire.Alloc))
        alloc = env.msg
        assert isinstance(alloc, wire.Alloc)
        # the Embedding rank is told of four blocks: its chunk is 64 tokens, past the 48
        # the Language rank allocated (a block it does not own among them)
        w.control.inject(LANG, EMB, wire.encode(wire.Alloc(
            alloc.room, alloc.lang_rank, alloc.instance_size, (*alloc.block_ids, 15), 4 * BS)))
        w.deliver_all()
        s = w.emb().sender(9)
        send(s, d)
        assert w.ended(r, "the room on the broken stream") is FAILED
        assert r.failure is not None and "num_tokens=64, expected at most 48" in r.failure, \
            r.failure
        w.run_until(lambda: w.lang().pool.allocator.num_free == 16, "the room's blocks back")
        w.run_until(lambda: LANG in w.emb().liveness.dead, "the Embedding rank told")
        assert "tore the pair down" in w.emb().liveness.dead[LANG]
        w.link().break_link("the Gloo pair is gone")  # its payload send can never complete
        assert w.ended(s, "the sender") is FAILED
        again = w.lang().receiver(10, src_rank=EMB)
        assert not again.init() and again.poll() is FAILED  # no ALLOC into the void
        w.settle_whole()


def test_pair_torn_down_on_one_side_is_torn_down_on_the_other() -> None:
    """Bug 1: the Embedding rank declares a Language rank dead (here: a heartbeat
    gap, as on an overloaded host) and tells it; the Language rank stops
    sending ALLOCs that would never be answered, and fails its rooms naming
    the reason, instead of each side holding a different view for good."""
    with World(cfg()) as w:
        r = w.lang().receiver(11, src_rank=EMB)
        assert r.init()
        w.deliver_all()
        # only the Embedding rank sees the silence: the Language rank's heartbeats are lost
        w.clock.advance(5.0)
        w.control.drop(lambda e: e.dst == EMB)
        w.emb().on_tick()
        assert LANG in w.emb().liveness.dead
        w.deliver_all()  # PAIR_DOWN (and the ABORT frame for the waiting ALLOC)
        assert w.ended(r, "the Language room") is FAILED
        assert EMB in w.lang().liveness.dead
        assert "tore the pair down" in w.lang().liveness.dead[EMB]
        again = w.lang().receiver(12, src_rank=EMB)
        assert not again.init() and again.poll() is FAILED  # no ALLOC into the void
        assert again.failure is not None and "down" in again.failure
        w.settle_whole()
        # The Language rank's meta recv stays posted (a Gloo recv cannot be
        # cancelled; its pair group's timeout ends it): the Gloo pair is gone.
        w.link().break_link("the Gloo pair is gone")


def test_room_id_from_another_embedding_rank_while_live_is_a_value_error() -> None:
    """Decided in DESIGN: room ids are unique among the live rooms of the whole
    world; a Language rank asked for a live room's id again, from another
    Embedding rank, raises a clear ValueError and loses nothing."""
    with World(cfg(num_embedding_ranks=2)) as w:
        lang = w.topology.language_ranks[0]
        d = room_data(w.cfg, 13, 30)
        s = w.emb(0).sender(13)
        send(s, d)
        r = w.lang(lang).receiver(13, src_rank=0)
        with pytest.raises(ValueError, match="room 13 is still live on language rank"):
            w.lang(lang).receiver(13, src_rank=1)
        assert r.init()
        assert w.finish(r, "room 13") is SUCCESS
        assert mismatches(r.result(), d) == []
        assert w.ended(s, "its sender") is SUCCESS
        w.settle_whole()


@pytest.mark.parametrize("alloc_first", [True, False], ids=["alloc_first", "send_first"])
def test_room_longer_than_the_whole_budget_fails_on_both_sides_at_once(
        alloc_first: bool) -> None:
    """Issue 18: a room longer than the whole Embedding budget raised ValueError
    but stayed live, so its Language side waited bootstrap_timeout. Now it
    fails on both sides at once, with the reason (the clock never moves)."""
    with World(cfg(), embedding_blocks=4) as w:  # 64 tokens of budget
        r = w.lang().receiver(14, src_rank=EMB)
        if alloc_first:
            assert r.init()
            w.deliver_all()
        s = w.emb().sender(14)
        d = room_data(w.cfg, 14, 100)
        with pytest.raises(ValueError, match="more than the whole budget of 4 blocks"):
            send(s, d)
        # FAILED once the ABORT frame answering the waiting ALLOC (if any) has left
        assert w.ended(s, "the sender") is FAILED and "whole budget" in (s.failure or "")
        if not alloc_first:
            assert r.init()
        assert w.ended(r, "the Language room") is FAILED
        assert r.failure is not None and "more than the whole budget" in r.failure, r.failure
        assert w.causes(EMB) == {"too_long": 1}
        w.settle_whole()


def test_send_on_a_room_that_already_failed_says_so() -> None:
    """Issue 18: send() on a room the Language side aborted before its data came
    did nothing, silently. It returns FAILED (and `failure` says why); the
    tensors are not taken."""
    with World(cfg()) as w:
        r = w.lang().receiver(15, src_rank=EMB)
        r.abort("client went away")
        w.deliver_all()
        s = w.emb().sender(15)
        assert send_status(s, room_data(w.cfg, 15, 20)) is FAILED
        assert s.failure is not None and "client went away" in s.failure
        assert w.emb().budget.num_free == w.emb().budget.num_blocks
        w.settle_whole()


def send_status(s: Any, d: Any) -> TransferStatus:
    return s.send(d.embeddings, d.fill_ids, d.mrope_positions, aux=d.aux, **d.extra)
