"""In-process layer: a room whose length the Language caller declares
(`init(seq_len=)`, `queue().add(..., seq_len=)`; DESIGN 0.2). The first
allocation covers it (where the pool allows), so the room moves in one chunk;
a real length that differs fails the room on both sides with both numbers in
the reason, the stream stays aligned, and the next room on the pair is fine."""

from __future__ import annotations

import pytest

from disagg.config import DisaggConfig
from disagg.queue import RoomQueue
from disagg.types import TransferStatus

from .fakes import World
from .rooms import mismatches, room_data, send

pytestmark = pytest.mark.timeout(60)

SUCCESS, FAILED = TransferStatus.SUCCESS, TransferStatus.FAILED
EMB, BS = 0, 16


def cfg(recv_into: str = "output") -> DisaggConfig:
    # a first allocation of one block unless the length is declared
    return DisaggConfig(hidden_size=32, block_size=BS, num_blocks=32, default_alloc_tokens=BS,
                        recv_into=recv_into)  # type: ignore[arg-type]


@pytest.mark.parametrize("recv_into", ["output", "pool"])
@pytest.mark.parametrize("alloc_first", [True, False], ids=["alloc_first", "data_first"])
def test_declared_length_moves_the_room_in_one_chunk(recv_into: str, alloc_first: bool) -> None:
    with World(cfg(recv_into), auto_control=True) as w:
        d = room_data(w.cfg, 1, 7 * BS + 3)
        r = w.lang().receiver(1, src_rank=EMB)
        if alloc_first:
            assert r.init(seq_len=d.seq)
        s = w.emb().sender(1)
        send(s, d)
        if not alloc_first:
            assert r.init(seq_len=d.seq)
        assert w.finish(r, "the room") is SUCCESS, r.failure
        assert mismatches(r.result(), d) == []
        assert w.ended(s, "its sender") is SUCCESS
        assert w.counter(w.topology.language_ranks[0], "chunks") == 1
        assert w.counter(w.topology.language_ranks[0], "resumes") == 0
        w.settle_whole()


@pytest.mark.parametrize("declared", [5 * BS, 9 * BS], ids=["shorter", "longer"])
@pytest.mark.parametrize("alloc_first", [True, False], ids=["alloc_first", "data_first"])
def test_a_wrong_declared_length_fails_both_sides_and_the_pair_stays_usable(
        declared: int, alloc_first: bool) -> None:
    with World(cfg(), auto_control=True) as w:
        d = room_data(w.cfg, 2, 7 * BS)
        r = w.lang().receiver(2, src_rank=EMB)
        if alloc_first:
            assert r.init(seq_len=declared)
        s = w.emb().sender(2)
        send(s, d)
        if not alloc_first:
            assert r.init(seq_len=declared)
        assert w.ended(r, "the Language room") is FAILED
        assert w.ended(s, "the sender") is FAILED
        for why in (r.failure, s.failure):
            assert why is not None and f"seq_len={declared}" in why and f"{7 * BS} tokens" in why
        assert w.causes(EMB) == {"length_mismatch": 1}
        w.settle_whole()
        # the stream is aligned: the next room on the same pair arrives bit-exact
        d3 = room_data(w.cfg, 3, 40)
        s3 = w.emb().sender(3)
        send(s3, d3)
        r3 = w.lang().receiver(3, src_rank=EMB)
        assert r3.init(seq_len=40)
        assert w.finish(r3, "the next room") is SUCCESS
        assert mismatches(r3.result(), d3) == []
        w.settle_whole()


def test_queue_add_with_seq_len() -> None:
    with World(cfg(), auto_control=True) as w:
        q = RoomQueue(w.lang(), None)
        rooms = {room: room_data(w.cfg, room, 20 + 30 * i) for i, room in enumerate((4, 5, 6))}
        for room, d in rooms.items():
            send(w.emb().sender(room), d)
            q.add(room, src_rank=EMB, seq_len=d.seq)
        got = {}
        w.run_until(lambda: bool(got.update(dict(q.step()[0]))) or len(got) == 3, "3 rooms")
        for room, d in rooms.items():
            assert mismatches(got[room], d) == []
        assert w.counter(w.topology.language_ranks[0], "resumes") == 0
        with pytest.raises(ValueError, match="seq_len=0"):
            q.add(7, src_rank=EMB, seq_len=0)
        w.settle_whole()
