"""In-process layer: what a serving loop needs to operate the library (DESIGN
0.3, "Operations"): `RoomQueue.cancel`, typed failures (`disagg.Failure` with a
cause and a rank on every path), timeouts that name what they waited for, and
the readiness summary."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import disagg
from disagg import queue as queue_mod
from disagg.config import DisaggConfig
from disagg.errors import Failure, FailureCause, LockstepError
from disagg.queue import RoomQueue, pack_failed_on
from disagg.shell import readiness
from disagg.types import TransferStatus

from .fakes import World
from .rooms import mismatches, room_data, send

pytestmark = pytest.mark.timeout(60)

EMB, LANG = 0, 1


def cfg(**kw: Any) -> DisaggConfig:
    base: dict[str, Any] = dict(hidden_size=32, block_size=16, num_blocks=16,
                                bootstrap_timeout=20.0, peer_timeout=4.0)
    base.update(kw)
    return DisaggConfig(**base)


def test_failure_and_its_causes_are_public() -> None:
    assert disagg.Failure is Failure and disagg.FailureCause is FailureCause
    assert disagg.StreamBroken.__name__ == "StreamBroken"
    f = Failure("room 3: gone", FailureCause.CANCELLED, 2)
    assert f == "room 3: gone" and isinstance(f, str)
    assert (f.cause, f.rank) == (FailureCause.CANCELLED, 2)
    import pickle
    g = pickle.loads(pickle.dumps(f))
    assert (g, g.cause, g.rank) == (f, f.cause, f.rank)


def test_cancel_on_one_rank_fails_the_room_everywhere_with_cause_cancelled() -> None:
    with World(cfg(), auto_control=True) as w:
        q = RoomQueue(w.lang(), None)
        s = w.emb().sender(7)
        q.add(7, src_rank=EMB, seq_len=40)
        assert q.step() == ([], [])  # the ALLOC left: the Embedding rank holds a lane
        q.cancel(7, "client disconnected")
        done, failed = q.step()
        assert done == [] and [room for room, _ in failed] == [7]
        why = failed[0][1]
        assert isinstance(why, Failure) and why.cause is FailureCause.CANCELLED
        assert why.rank == w.topology.language_ranks[0] and "client disconnected" in why
        assert len(q) == 0
        # the Embedding side is told: its sender ends FAILED, cause CANCELLED
        assert w.ended(s, "the sender") is TransferStatus.FAILED
        assert s.failure is not None and s.failure.cause is FailureCause.CANCELLED
        assert w.causes(EMB).get("cancelled") == 1
        w.settle_whole()  # blocks and budget back
        # the id is free again
        s2 = w.emb().sender(7)
        send(s2, d := room_data(w.cfg, 7, 40))
        q.add(7, src_rank=EMB, seq_len=40)
        done = w.run_until(lambda: q.step()[0], "room 7 again")
        assert not mismatches(done[0][1], d)
        w.ended(s2, "the second sender")
        w.settle_whole()
        with pytest.raises(ValueError, match="not in this queue"):
            q.cancel(99)


def test_a_rank_that_did_not_cancel_names_the_rank_and_the_cause(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with World(cfg(), auto_control=True) as w:
        window = 4
        q = RoomQueue(w.lang(), object(), window=window)

        def rank_5_cancelled(buf: torch.Tensor, h: int) -> None:
            buf[h] = int(TransferStatus.FAILED)
            buf[h + window] = pack_failed_on(5, Failure("gone", FailureCause.CANCELLED, 5))

        def all_reduce(buf: torch.Tensor, op: object = None, group: object = None) -> None:
            theirs = buf.clone()
            rank_5_cancelled(theirs, queue_mod._HEADER)
            torch.minimum(buf, theirs, out=buf)

        monkeypatch.setattr(queue_mod.dist, "all_reduce", all_reduce)
        monkeypatch.setattr(queue_mod.dist, "get_world_size", lambda group=None: 2)
        s = w.emb().sender(3)  # its data not given yet: the room is not decided
        q.add(3, src_rank=EMB)
        _, failed = q.step()
        why = failed[0][1]
        assert why.cause is FailureCause.CANCELLED and why.rank == 5, repr(why)
        assert w.ended(s, "the sender") is TransferStatus.FAILED
        assert s.failure.cause is FailureCause.CANCELLED  # this rank's abort said so too
        w.settle_whole()


def test_every_failure_path_carries_a_cause_and_a_rank() -> None:
    with World(cfg(), auto_control=True) as w:
        # the Language caller aborts
        s = w.emb().sender(1)
        send(s, room_data(w.cfg, 1, 20))
        r = w.lang().receiver(1, src_rank=EMB)
        r.abort("not wanted")
        assert r.failure.cause is FailureCause.ABORT and r.failure.rank == LANG
        assert w.ended(s, "sender 1") is TransferStatus.FAILED
        assert s.failure.cause is FailureCause.ABORT and s.failure.rank == EMB
        # the declared length is not the room's
        s = w.emb().sender(2)
        send(s, room_data(w.cfg, 2, 20))
        r = w.lang().receiver(2, src_rank=EMB)
        assert r.init(seq_len=21)
        assert w.ended(r, "receiver 2") is TransferStatus.FAILED
        assert r.failure.cause is FailureCause.ABORTED_BY_PEER, repr(r.failure)
        assert w.ended(s, "sender 2") is TransferStatus.FAILED
        assert s.failure.cause is FailureCause.LENGTH_MISMATCH
        # the Embedding caller aborts first
        s = w.emb().sender(3)
        s.abort("encoder crashed")
        assert s.failure.cause is FailureCause.ABORT
        r = w.lang().receiver(3, src_rank=EMB)  # asks for a room that already failed there
        assert r.init()
        assert w.ended(r, "receiver 3") is TransferStatus.FAILED
        assert r.failure.cause is FailureCause.ABORTED_BY_PEER
        assert "encoder crashed" in r.failure
        assert r.failure.count("embedding rank 0: ") == 1, r.failure  # said once, not nested
        w.settle_whole()


def test_a_room_nobody_stepped_says_so_when_it_times_out() -> None:
    with World(cfg(bootstrap_timeout=2.0)) as w:
        r = w.lang().receiver(4, src_rank=EMB)  # made, never init(): a queue not stepped
        w.advance(3.0)
        assert r.poll() is TransferStatus.FAILED
        assert r.failure.cause is FailureCause.TIMEOUT
        assert "no init() call" in r.failure and "no free blocks" not in r.failure


def test_a_room_without_blocks_says_so_when_it_times_out() -> None:
    with World(cfg(bootstrap_timeout=2.0), language_blocks=1) as w:
        s = w.emb().sender(1)
        send(s, room_data(w.cfg, 1, 16))
        hog = w.lang().receiver(1, src_rank=EMB)
        assert hog.init()  # the one block, held: the room's data never comes for it
        r = w.lang().receiver(2, src_rank=EMB)
        assert not r.init()
        w.advance(3.0)
        assert r.poll() is TransferStatus.FAILED
        assert "no free blocks" in r.failure and r.failure.cause is FailureCause.TIMEOUT
        w.finish(hog, "room 1")
        w.ended(s, "sender 1")
        w.settle_whole()


def test_readiness_says_why_not() -> None:
    ok = {0: {"alive": True, "pair": "ok"}}
    lost = {0: {"alive": False, "pair": "lost: no heartbeat for 10s"}}
    assert readiness("language", ok, False)["ready"] is True
    r = readiness("language", lost, False)
    assert r["ready"] is False and "no embedding rank alive" in str(r["reason"])
    assert r["peers_down"] == {0: "lost: no heartbeat for 10s"}
    r = readiness("language", ok, False, "the other TP ranks did not step()")
    assert r["ready"] is False and r["instance"].startswith("lost: ")
    assert readiness("embedding", ok, True) == {
        "peers_alive": [0], "peers_down": {}, "ready": False, "reason": "this rank shut down"}


def test_a_lost_instance_fails_every_queued_room_and_the_queue_refuses_more(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with World(cfg(), auto_control=True) as w:
        q = RoomQueue(w.lang(), object())
        senders = []
        for room in (1, 2):  # asked for, their data not given yet
            senders.append(w.emb().sender(room))
            q.add(room, src_rank=EMB)

        def dead(buf: torch.Tensor, op: object = None, group: object = None) -> None:
            raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")
        monkeypatch.setattr(queue_mod.dist, "all_reduce", dead)
        monkeypatch.setattr(queue_mod.dist, "get_world_size", lambda group=None: 2)
        with pytest.raises(LockstepError, match="Connection closed by peer"):
            q.step()
        assert len(q) == 0
        with pytest.raises(LockstepError):
            q.add(3, src_rank=EMB)
        with pytest.raises(LockstepError):
            q.step()
        assert w.lang().instance_lost is not None
        for s in senders:  # their Embedding rank is told
            assert w.ended(s, "a sender") is TransferStatus.FAILED
        w.settle_whole()
