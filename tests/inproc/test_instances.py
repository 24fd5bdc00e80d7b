"""In-process layer: rooms and Language instances.

Ported from test_topology.py: a room is received by one Language instance, so
a second instance that claims it (before the data, or while the first one's
transfer is half done) is refused, alone, with a reason saying who holds it;
the first instance still gets every byte. With a TP-2 instance, the sender is
SUCCESS only once every TP rank received everything, and TP ranks whose pools
differ chunk the same room differently, yet hold identical results.
"""

from __future__ import annotations

from typing import Any

import pytest

from disagg.config import DisaggConfig
from disagg.types import TransferStatus

from .fakes import World
from .rooms import mismatches, room_data, send

pytestmark = pytest.mark.timeout(60)

SUCCESS, FAILED = TransferStatus.SUCCESS, TransferStatus.FAILED
HIDDEN = 64
BS = 16
FIRST = 64  # default_alloc_tokens: 4 blocks


def cfg(**kw: Any) -> DisaggConfig:
    return DisaggConfig(hidden_size=HIDDEN, block_size=BS, num_blocks=12,
                        default_alloc_tokens=FIRST, bootstrap_timeout=40.0,
                        peer_timeout=10.0).replace(**kw)


def two_instances() -> World:
    """Embedding ranks 0, 1; Language instances {2} and {3}, as e2_2x1."""
    return World(cfg(num_embedding_ranks=2, auto_resume=False), instances=2,
                 embedding_blocks=80,
                 per_rank={2: {"recv_into": "output"}, 3: {"recv_into": "pool"}})


@pytest.mark.parametrize("data_first", [False, True], ids=["before_data", "during_transfer"])
def test_room_claimed_by_two_instances(data_first: bool) -> None:
    room, seq = 7, 300
    with two_instances() as w:
        d = room_data(w.cfg, room, seq)
        s = w.emb(0).sender(room)
        if data_first:
            send(s, d)
        first = w.lang(2).receiver(room, src_rank=0)
        assert first.init(2 * BS if data_first else None)
        w.deliver_all()  # the first claim is in: early ALLOC, or chunk 0 on its way
        if data_first:  # manual resume: the room holds still, partly landed
            w.run_until(lambda: first.needs_resume, "the first partial chunk")
            assert first.poll() is TransferStatus.TRANSFERRING
            assert first.progress == (2 * BS, seq)
        else:
            assert first.poll() is TransferStatus.WAITING_FOR_INPUT
        second = w.lang(3).receiver(room, src_rank=0)
        assert second.init() is True  # nothing raises on the Language side
        assert w.ended(second, "the second claim") is FAILED
        assert second.failure is not None and "claimed by language instance" in second.failure
        assert "instance 0" in second.failure, second.failure
        if not data_first:
            send(s, d)
        assert w.finish(first, "the first claim") is SUCCESS, first.failure
        assert mismatches(first.result(), d) == []
        assert w.ended(s, "sender") is SUCCESS, s.failure
        assert w.counter(0, "bytes_sent") == w.counter(2, "bytes_received") > 0
        assert w.counter(3, "bytes_received") == 0
        assert w.causes(2) == {}
        w.settle_whole()


def tp2(*, auto_control: bool = False) -> World:
    """Embedding rank 0; one Language instance of TP ranks 1 and 2."""
    return World(cfg(language_tp_size=2, recv_into="pool"), embedding_blocks=80,
                 per_rank={1: {"num_blocks": 64}, 2: {"num_blocks": 6}},
                 auto_control=auto_control)


def test_sender_success_waits_for_every_tp_rank() -> None:
    """TP rank 1 receives the whole room while TP rank 2's link holds its
    chunk: the sender is not SUCCESS, although its byte count shows rank 1's
    share sent; it is once TP rank 2 has it too."""
    room, seq = 20, 300
    with tp2() as w:
        d = room_data(w.cfg, room, seq)
        s = w.emb().sender(room)
        send(s, d)
        w.link(0, 2).gate()
        receivers = {rank: w.lang(rank).receiver(room, src_rank=0) for rank in (1, 2)}
        assert all(r.init() for r in receivers.values())
        assert w.finish(receivers[1], "TP rank 1") is SUCCESS
        nbytes = seq * w.lang(1).geometry.token_nbytes
        w.run_until(lambda: w.counter(0, "bytes_sent") >= nbytes, "rank 1's share counted")
        assert w.counter(0, "bytes_sent") == nbytes
        assert s.poll() not in (SUCCESS, FAILED), s.poll()
        w.link(0, 2).open()
        assert w.finish(receivers[2], "TP rank 2") is SUCCESS
        assert w.ended(s, "sender") is SUCCESS, s.failure
        for r in receivers.values():
            assert mismatches(r.result(), d) == []
        w.settle_whole()


def test_tp_ranks_allocate_and_resume_on_their_own() -> None:
    """TP rank 1's pool is 64 blocks, TP rank 2's 6: the same rooms, one at a
    time, take 6 chunks on rank 1 and 13 on rank 2, yet arrive identical."""
    seqs = {30: 600, 31: 333, 32: 97}
    with tp2(auto_control=True) as w:  # control messages flow as they come
        for room, seq in seqs.items():
            d = room_data(w.cfg, room, seq)
            s = w.emb().sender(room)
            send(s, d)
            for rank in (1, 2):
                r = w.lang(rank).receiver(room, src_rank=0)
                assert r.init()
                assert w.finish(r, f"room {room} on TP rank {rank}") is SUCCESS, r.failure
                assert mismatches(r.result(), d) == []
            assert w.ended(s, f"sender {room}") is SUCCESS
        assert [w.counter(rank, "chunks") for rank in (1, 2)] == [6, 13]
        assert w.counter(0, "chunks") == 19
        nbytes = sum(seqs.values()) * w.lang(1).geometry.token_nbytes
        assert w.counter(1, "bytes_received") == w.counter(2, "bytes_received") == nbytes
        assert w.counter(0, "bytes_sent") == 2 * nbytes
        assert all(w.causes(rank) == {} for rank in (0, 1, 2))
        w.settle_whole()
