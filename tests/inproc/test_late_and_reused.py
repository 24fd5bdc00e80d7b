"""In-process layer: messages that arrive after their room ended, ids reused by
the same or another instance, and peers declared dead with frames on the wire
(issue 23's findings, one test each, driven exactly: gated links, held control
messages, a fake clock). Each failed before its fix. The fake links match
sends and recvs by order and fail the test on any size disagreement, where
Gloo would abort the Language process (`gloo::EnforceNotMet`).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from disagg import queue as queue_mod
from disagg import wire
from disagg.config import DisaggConfig
from disagg.queue import RoomQueue
from disagg.types import TransferStatus

from .fakes import World
from .rooms import mismatches, room_data, send

pytestmark = pytest.mark.timeout(60)

SUCCESS, FAILED = TransferStatus.SUCCESS, TransferStatus.FAILED
BS, EMB, LANG = 16, 0, 1
PEER_TIMEOUT = 4.0


def cfg(**kw: Any) -> DisaggConfig:
    return DisaggConfig(hidden_size=32, block_size=BS, num_blocks=16,
                        default_alloc_tokens=2 * BS, bootstrap_timeout=20.0,
                        peer_timeout=PEER_TIMEOUT).replace(**kw)


def is_resume(preposted: bool) -> Any:
    return lambda e: isinstance(e.msg, wire.Resume) and e.msg.preposted == preposted


def half_sent(w: World, room: int, seq: int) -> tuple[Any, Any, Any]:
    """A room of `seq` tokens, the Language rank asking for 2 blocks: chunk 0's
    meta has landed (FLAG_GIVEN: the sender holds it all), its payload is held
    on the gated wire, and the eager RESUME, pre-posted, is held in the control
    plane. (receiver, sender, data)."""
    link = w.link()
    link.gate()
    d = room_data(w.cfg, room, seq)
    r = w.lang().receiver(room, src_rank=EMB)
    assert r.init()
    w.deliver_all()
    s = w.emb().sender(room)
    send(s, d)
    link.deliver(1)  # chunk 0's meta alone
    w.run_until(lambda: w.control.pending(is_resume(True)), "the eager pre-posted RESUME",
                deliver=False)
    return r, s, d


def test_a_preposted_resume_reaching_a_failing_room_is_answered_to_its_size() -> None:
    """Finding 1 (critical): the Embedding caller aborts a room whose chunk 0 is
    on the wire; the Language rank's eager RESUME, pre-posted, reaches the room
    while it is failing. Its refusal must be padded to the posted sizes: it was
    a bare 256-byte ABORT against 16 MiB posted (Gloo killed the process)."""
    with World(cfg(recv_into="pool")) as w:
        r, s, _ = half_sent(w, 3, 4 * BS)
        s.abort("the encoder gave up")
        assert s.poll() is TransferStatus.TRANSFERRING  # failing: chunk 0 on the wire
        w.deliver_all()  # the RESUME meets the failing room
        w.link().open()
        assert w.ended(r, "the room") is FAILED
        assert w.ended(s, "its sender") is FAILED
        assert "the encoder gave up" in (r.failure or ""), r.failure
        assert w.counter(LANG, "preposted") == 1
        w.settle_whole()
        one_room(w, 4, 3 * BS)  # the pair stayed in step


def test_tp_rank_abort_before_any_alloc_refuses_the_other_ranks_later_alloc() -> None:
    """Finding 2: TP 2, bare receivers. Rank 1's ABORT reaches the Embedding
    rank before any ALLOC; rank 2's ALLOC comes after it but before
    `sender()`. It is answered at once; `sender()` used to drop it unanswered
    (its blocks held until the transport timeout)."""
    with World(cfg(language_tp_size=2)) as w:
        r1 = w.lang(1).receiver(7, src_rank=EMB)
        r1.abort("client went away")
        w.deliver_all()
        r2 = w.lang(2).receiver(7, src_rank=EMB)
        assert r2.init()
        assert w.ended(r2, "rank 2's room") is FAILED  # the clock never moved
        assert "client went away" in (r2.failure or ""), r2.failure
        s = w.emb().sender(7)
        assert s.poll() is FAILED and "client went away" in (s.failure or "")
        assert not w.emb().lobby.holds(7)
        w.settle_whole()


def test_a_late_preposted_resume_meeting_a_reused_id_leaves_the_new_room_alone() -> None:
    """Finding 3: the room failed on both sides (chunk 0 landed, then the
    Embedding caller aborted), the Embedding caller reused the id, and then the
    old pre-posted RESUME arrived. It is answered with filler of its own
    posted size, and the new room is untouched; it used to be refused as
    "RESUME before ALLOC", sized from the new room, failing it."""
    with World(cfg(recv_into="pool")) as w:
        r, s, _ = half_sent(w, 5, 4 * BS)
        w.link().deliver_frame()  # chunk 0's payload: the frame completes
        lane = w.emb()._rooms[5].lanes[LANG]
        w.run_until(lambda: lane.in_flight == 0, "chunk 0's send completed",
                    deliver=False)
        s.abort("the encoder gave up")
        assert s.poll() is FAILED  # nothing in flight: ended at once, the RESUME still held
        new = w.emb().sender(5)  # reused: the room ended here
        d = room_data(w.cfg, 5, 3 * BS)
        send(new, d)
        w.deliver_all()  # the old RESUME, then the REJECT to the Language rank
        w.link().open()
        assert w.ended(r, "the old room") is FAILED
        # FAILED is published while it drains; its id is free once the padded
        # ABORT frame answered its pre-posted RESUME
        w.run_until(lambda: not w.lang().room_live(5), "the old room's answer")
        assert new.poll() is not FAILED, new.failure
        retry = w.lang().receiver(5, src_rank=EMB)
        assert retry.init()
        assert w.finish(retry, "the new room") is SUCCESS, retry.failure
        assert w.ended(new, "the new sender") is SUCCESS, new.failure
        assert mismatches(retry.result(), d) == []
        w.settle_whole()


def test_queue_prefix_is_the_same_on_every_tp_rank_until_the_next_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 4: after a step() agreed ready_tokens, the room fails on this rank
    (a REJECT) before the next step(). q.prefix() must still give the agreed
    views, as a rank the REJECT has not reached does; it used to raise on one
    rank only, so one rank prefilled and the other did not."""
    seq = 3 * BS

    def all_reduce(buf: torch.Tensor, op: Any = None, group: Any = None) -> None:
        pass  # the other TP rank (scripted) holds what this one holds

    monkeypatch.setattr(queue_mod.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(queue_mod.dist, "get_world_size", lambda group=None: 2)
    with World(cfg(auto_resume=False, default_alloc_tokens=BS)) as w:
        q = RoomQueue(w.lang(), object())
        d = room_data(w.cfg, 3, seq)
        s = w.emb().sender(3)
        send(s, d)
        q.add(3, src_rank=EMB)

        def agreed() -> bool:
            q.step()
            return q.ready_tokens(3) == BS
        w.run_until(agreed, "the first chunk agreed")
        s.abort("the encoder gave up")
        w.deliver_all()
        w.run_until(lambda: not w.lang().room_live(3), "the REJECT landed here")
        p = q.prefix(3)
        assert torch.equal(p.embeddings.view(torch.int16), d.embeddings[:BS].view(torch.int16))
        assert torch.equal(p.fill_ids, d.fill_ids[:BS])
        done, failed = q.step()
        assert done == [] and [room for room, _ in failed] == [3]
        w.settle_whole()


def test_room_id_reused_by_another_instance_alloc_first() -> None:
    """Finding 5: a router retries a dead instance's room on another instance
    under the same id; the new ALLOC comes before the new `sender()`. It is the
    new room's (DESIGN: an id is reusable once its room ended on every rank),
    not refused as "ALLOC for a room that already ended"."""
    with World(cfg(), instances=2) as w:
        one_room(w, 9, 40, lang=1)
        r = w.lang(2).receiver(9, src_rank=EMB)
        assert r.init()
        w.deliver_all()
        assert w.emb().lobby.holds(9, 2)
        d = room_data(w.cfg, 9, 50)
        s = w.emb().sender(9)
        send(s, d)
        assert w.finish(r, "the retried room") is SUCCESS, r.failure
        assert w.ended(s, "its sender") is SUCCESS
        assert mismatches(r.result(), d) == []
        w.settle_whole()


def test_a_frozen_embedding_rank_ends_the_landing_room_at_peer_timeout() -> None:
    """Finding 6, Language side: the Embedding rank freezes while a chunk lands
    (meta read, payload posted). Declared dead after peer_timeout, the room
    fails at once with PEER_LOST; the blocks under the payload stay held until
    the transport gives the recv back. It used to wait for the pair's
    transport timeout (320 s with the defaults)."""
    with World(cfg(recv_into="pool", auto_resume=False)) as w:  # nothing else owed
        link = w.link()
        link.gate()
        r = w.lang().receiver(11, src_rank=EMB)
        assert r.init()
        w.deliver_all()
        send(w.emb().sender(11), room_data(w.cfg, 11, 4 * BS))
        link.deliver(1)  # the meta; the payload never comes
        w.run_until(lambda: r.progress[1] is not None, "the meta read")
        w.mute(EMB)
        w.advance(PEER_TIMEOUT * 1.5)
        assert r.poll() is FAILED, "still waiting for the transport"
        assert "no heartbeat" in (r.failure or ""), r.failure
        assert w.causes(LANG) == {"peer_lost": 1}
        assert w.lang().pool.allocator.num_free < 16  # the payload's blocks: still posted
        health = w.lang().health()[EMB]
        assert health["alive"] is False and str(health["pair"]).startswith("lost")
        link.break_link("the transport's timeout")  # the recv comes back
        w.run_until(lambda: w.lang().pool.allocator.num_free == 16, "the blocks back")
        w.close(check=False)


def test_a_frozen_language_rank_ends_the_sending_room_at_peer_timeout() -> None:
    """Finding 6, Embedding side: the Language rank freezes while a chunk is on
    the wire. Declared dead, the sender fails at once (PEER_LOST); its budget
    waits for the transport to give the send back."""
    with World(cfg()) as w:
        link = w.link()
        link.gate()
        r = w.lang().receiver(12, src_rank=EMB)
        assert r.init()
        w.deliver_all()
        s = w.emb().sender(12)
        send(s, room_data(w.cfg, 12, 4 * BS))
        link.deliver(1)
        w.mute(LANG)
        w.advance(PEER_TIMEOUT * 1.5)
        assert s.poll() is FAILED, "still waiting for the transport"
        assert "language rank 1 is down" in (s.failure or ""), s.failure
        assert w.emb().budget.num_free < w.emb().budget.num_blocks
        health = w.emb().health()[LANG]
        assert health["alive"] is False and str(health["pair"]).startswith("lost")
        link.break_link("the transport's timeout")
        w.run_until(lambda: w.emb().budget.num_free == w.emb().budget.num_blocks,
                    "the budget back")
        w.close(check=False)


def test_alive_is_false_whenever_the_pair_is_lost_and_after_shutdown() -> None:
    """Finding 7: one meaning for health()'s `alive`. A stream broken on this
    side (a frame that disagrees with its allocation) used to leave `alive`
    True, heard recently, beside `pair: lost`."""
    with World(cfg(recv_into="pool")) as w:
        r = w.lang().receiver(13, src_rank=EMB)
        assert r.init()  # 2 blocks
        (env,) = w.control.drop(lambda e: isinstance(e.msg, wire.Alloc))
        a = env.msg
        assert isinstance(a, wire.Alloc)
        w.control.inject(LANG, EMB, wire.encode(wire.Alloc(  # told of one block more
            a.room, a.lang_rank, a.instance_size, (*a.block_ids, 15), 3 * BS)))
        w.deliver_all()
        send(w.emb().sender(13), room_data(w.cfg, 13, 3 * BS))
        assert w.ended(r, "the room on the broken stream") is FAILED
        view = w.lang().health()[EMB]
        assert view["alive"] is False and str(view["pair"]).startswith("lost"), view
        w.link().break_link("the Gloo pair is gone")
        w.close(check=False)
    with World(cfg()) as w:
        one_room(w, 14, 20)
        assert w.lang().health()[EMB]["alive"] is True
        assert w.emb().health()[LANG]["alive"] is True
        w.lang().close(5.0)
        w.emb().close(5.0)
        assert w.lang().health()[EMB]["alive"] is False
        assert w.emb().health()[LANG]["alive"] is False
        w.close(check=False)


def one_room(w: World, room: int, seq: int, *, lang: int = LANG) -> None:
    d = room_data(w.cfg, room, seq)
    r = w.lang(lang).receiver(room, src_rank=EMB)
    assert r.init()
    s = w.emb().sender(room)
    send(s, d)
    assert w.finish(r, f"room {room}") is SUCCESS, r.failure
    assert w.ended(s, f"sender {room}") is SUCCESS, s.failure
    assert mismatches(r.result(), d) == []


@pytest.mark.parametrize("sender_first", [False, True], ids=["alloc_first", "sender_first"])
def test_an_alloc_contradicting_its_instance_fails_the_room_whichever_came_first(
        sender_first: bool) -> None:
    """Issue 25 item 6, one rule for ALLOC admission: TP rank 2's ALLOC says
    instance_size=1 where rank 1's said 2. The instance's view of the room is
    inconsistent, so the room fails and both ranks are answered, whether the
    Embedding caller's sender() came first or not (before, an ALLOC ahead of
    sender() refused only itself, and rank 1 went on to SUCCESS alone)."""
    with World(cfg(language_tp_size=2)) as w:
        d = room_data(w.cfg, 21, 40)
        s = w.emb().sender(21) if sender_first else None
        r1 = w.lang(1).receiver(21, src_rank=EMB)
        r2 = w.lang(2).receiver(21, src_rank=EMB)
        assert r1.init()
        w.deliver_all()
        assert r2.init()
        (env,) = w.control.drop(lambda e: isinstance(e.msg, wire.Alloc))
        a = env.msg
        assert isinstance(a, wire.Alloc)
        w.control.inject(2, EMB, wire.encode(wire.Alloc(
            a.room, a.lang_rank, 1, a.block_ids, a.allocated_tokens, a.direct)))
        w.deliver_all()
        if s is None:
            s = w.emb().sender(21)
        send(s, d)
        assert w.ended(r1, "rank 1's room") is FAILED, r1.failure
        assert w.ended(r2, "rank 2's room") is FAILED
        assert w.ended(s, "the sender") is FAILED
        assert "instance_size=1 disagrees with 2" in (s.failure or ""), s.failure
        assert "instance_size=1 disagrees with 2" in (r1.failure or ""), r1.failure
        w.settle_whole()
