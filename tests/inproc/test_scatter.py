"""In-process layer: fanout="scatter".

Rank i of a TP-T instance asks for and receives only its token slice of a
room (`plan.scatter_slice`), through the same ALLOC / RESUME / ABORT
machinery as a whole room; the Embedding rank sends seq_len tokens in all,
not T x seq_len. A rank whose slice is empty (a room shorter than the
instance) gets one meta frame that tells it seq_len. Here the instance's
all-gather is done by hand (the real one is a collective, tested on real
ranks in test_topology.py): each rank's slice rows are copied into the other
ranks' outputs, then every rank's result must be bit-exact.
"""

from __future__ import annotations

from typing import Any

import pytest

from disagg.config import DisaggConfig
from disagg.errors import DisaggError, FailureCause
from disagg.plan import scatter_slice
from disagg.types import TransferStatus

from .fakes import World
from .rooms import gather_by_hand, mismatches, receive_everywhere, receivers_of, room_data, send

pytestmark = pytest.mark.timeout(60)

SUCCESS, FAILED = TransferStatus.SUCCESS, TransferStatus.FAILED
HIDDEN = 32
BS = 8
FIRST = 128  # default_alloc_tokens: 16 blocks, a whole pool of the default size


def cfg(tp: int, **kw: Any) -> DisaggConfig:
    return DisaggConfig(hidden_size=HIDDEN, block_size=BS, num_blocks=16,
                        default_alloc_tokens=FIRST, language_tp_size=tp, fanout="scatter",
                        extra_buffers={"deepstack": ((2, 4), "bfloat16")},
                        bootstrap_timeout=40.0, peer_timeout=10.0).replace(**kw)


@pytest.mark.parametrize("tp", [2, 3, 4])
@pytest.mark.parametrize("recv_into", ["output", "pool"])
def test_each_rank_receives_its_slice_and_the_gather_makes_the_room(
        tp: int, recv_into: str) -> None:
    seqs = [1, 2, 3, 5, BS, BS + 1, FIRST + 3, 101]
    # the first rank's pool is small (its slices resume), the others' are not
    with World(cfg(tp, recv_into=recv_into), embedding_blocks=256, auto_control=True,
               per_rank={1: {"num_blocks": 2}}) as w:
        nb = w.emb().geometry.token_nbytes
        for i, seq in enumerate(seqs):
            room = 10 + i
            sent_before = w.counter(0, "bytes_sent")
            received_before = [w.counter(r, "bytes_received") for r in w.topology.language_ranks]
            rs, d = receive_everywhere(w, room, seq)
            # every byte leaves the Embedding rank once; each rank got its slice
            assert w.counter(0, "bytes_sent") - sent_before == seq * nb
            for k, rank in enumerate(w.topology.language_ranks):
                lo, hi = scatter_slice(seq, tp, k)
                assert w.counter(rank, "bytes_received") - received_before[k] == (hi - lo) * nb
                assert rs[k].progress == (hi - lo, seq)
            with pytest.raises(DisaggError, match=r"queue\(\)\.step\(\)"):
                rs[0].result()  # a slice is not a room
            gather_by_hand(rs)
            for k, r in enumerate(rs):
                assert mismatches(r.result(), d) == [], (seq, k)
        assert w.counter(1, "resumes") > 0  # the small pool resumed ...
        assert w.counter(2, "resumes") == 0  # ... the large ones did not


def test_empty_slice_is_one_meta_frame() -> None:
    """seq 1 on TP 4: rank 0 gets the token; ranks 1-3 get a DATA meta with no
    payload (FIRST|LAST, num_tokens 0) that tells them seq_len."""
    with World(cfg(4), embedding_blocks=64, auto_control=True) as w:
        d = room_data(w.cfg, 3, 1)
        s = w.emb().sender(3)
        send(s, d)
        rs = receivers_of(w, 3)
        for r in rs:
            assert r.init(seq_len=1)
        for r in rs:
            assert w.ended(r, "receiver") is SUCCESS
        for k, rank in enumerate(w.topology.language_ranks):
            (meta,) = w.link(0, rank).metas()
            assert (meta.num_tokens, meta.seq_len, meta.first, meta.last) == (
                1 if k == 0 else 0, 1, True, True)
            assert meta.token_offset == min(k, 1)
        gather_by_hand(rs)
        for r in rs:
            assert mismatches(r.result(), d) == []


def test_a_slice_aborted_on_one_rank_fails_the_room_everywhere() -> None:
    """TP rank 1 aborts mid-room: the Embedding room fails; rank 0, which holds
    its slice already or has an allocation owed, learns by REJECT or ABORT
    frame. Every block comes back (World.close checks)."""
    with World(cfg(2, auto_resume=False), embedding_blocks=64) as w:
        d = room_data(w.cfg, 5, 200)
        s = w.emb().sender(5)
        send(s, d)
        r0, r1 = receivers_of(w, 5)
        assert r0.init(2 * BS) and r1.init(2 * BS)
        w.deliver_all()
        w.run_until(lambda: r0.needs_resume and r1.needs_resume, "both first chunks")
        r1.abort("the scheduler dropped it")
        w.deliver_all()
        assert w.ended(r1, "r1") is FAILED and "scheduler dropped it" in (r1.failure or "")
        assert w.ended(r0, "r0") is FAILED
        assert "aborted by language rank 2" in (r0.failure or ""), r0.failure
        assert w.ended(s, "sender") is FAILED


def test_killed_embedding_rank_fails_every_slice() -> None:
    with World(cfg(2, auto_resume=False), embedding_blocks=64) as w:
        d = room_data(w.cfg, 6, 200)
        s = w.emb().sender(6)
        send(s, d)
        rs = receivers_of(w, 6)
        for r in rs:
            assert r.init(2 * BS)
        w.deliver_all()
        w.run_until(lambda: all(r.needs_resume for r in rs), "first chunks")
        w.kill(0)
        w.advance(3 * w.cfg.peer_timeout)
        for r, rank in zip(rs, w.topology.language_ranks, strict=True):
            assert w.ended(r, "receiver") is FAILED
            assert w.causes(rank).get(FailureCause.PEER_LOST.value) == 1, w.causes(rank)
        assert s.poll() is not SUCCESS


def test_alloc_that_mixes_fanouts_in_one_room_is_refused() -> None:
    """An instance whose ranks disagree on fanout (`disagg.init` refuses that;
    here rank 2 is made so by hand): the ALLOC that disagrees with the room's
    first lane is refused with the reason, and the room fails on both."""
    with World(cfg(2, auto_resume=False), embedding_blocks=64,
               per_rank={2: {"fanout": "copy"}}) as w:
        d = room_data(w.cfg, 8, 40)
        s = w.emb().sender(8)
        send(s, d)
        r0 = w.lang(1).receiver(8, src_rank=0)
        assert r0.init(BS)  # a partial slice: it holds still, waiting to resume
        w.deliver_all()
        w.run_until(lambda: r0.needs_resume, "r0's first chunk")
        r1 = w.lang(2).receiver(8, src_rank=0)
        assert r1.init()
        w.deliver_all()
        assert w.ended(s, "sender") is FAILED
        assert "fanout=copy disagrees" in (s.failure or ""), s.failure
        assert w.ended(r1, "r1") is FAILED and "fanout=copy disagrees" in (r1.failure or "")
        assert w.ended(r0, "r0") is FAILED
