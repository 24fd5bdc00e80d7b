"""In-process layer: progressive send (DESIGN 0.2). The first `send()` gives the
room's first part and declares its length (`seq_len=`), later calls the next
parts in order, e.g. one image at a time as the encoder produces it. What
waiting allocations can take of a part leaves at once; parts given already
coalesce into one chunk; the Language side's prefix grows part by part. Bit-exact, pool and
output modes, many part shapes, with misuse, aborts and timeouts between
parts."""

from __future__ import annotations

from typing import Any

import pytest

from disagg.config import DisaggConfig
from disagg.types import TransferStatus

from .fakes import World
from .rooms import RoomData, mismatches, room_data

pytestmark = pytest.mark.timeout(60)

SUCCESS, FAILED = TransferStatus.SUCCESS, TransferStatus.FAILED
EMB, BS = 0, 16


def cfg(recv_into: str = "output", first: int = 3 * BS, **kw: Any) -> DisaggConfig:
    return DisaggConfig(hidden_size=32, block_size=BS, num_blocks=32, default_alloc_tokens=first,
                        recv_into=recv_into, bootstrap_timeout=20.0,  # type: ignore[arg-type]
                        peer_timeout=4.0).replace(**kw)


def give(s: Any, d: RoomData, a: int, b: int, **kw: Any) -> TransferStatus:
    """Tokens [a, b) of the room as one part."""
    assert d.mrope_positions is not None
    return s.send(d.embeddings[a:b], d.fill_ids[a:b], d.mrope_positions[:, a:b], **kw)


def cuts(seq: int, sizes: list[int]) -> list[tuple[int, int]]:
    out, a = [], 0
    for n in sizes:
        out.append((a, min(seq, a + n)))
        a += n
    if a < seq:
        out.append((a, seq))
    return [c for c in out if c[0] < c[1]]


SHAPES = {
    "one_part": (100, [100]),
    "one_token_parts": (20, [1] * 20),
    "block_minus_one": (100, [BS - 1] * 7),
    "block_plus_one": (100, [BS + 1] * 6),
    "splits_a_chunk": (150, [40, 70, 40]),
    "64_parts": (64 * 3, [3] * 64),
}


@pytest.mark.parametrize("recv_into", ["output", "pool"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("first", [BS, 3 * BS], ids=["small_first_alloc", "first_alloc_48"])
def test_parts_arrive_bit_exact(recv_into: str, shape: str, first: int) -> None:
    seq, sizes = SHAPES[shape]
    with World(cfg(recv_into, first), auto_control=True) as w:
        d = room_data(w.cfg, 1, seq)
        r = w.lang().receiver(1, src_rank=EMB)
        assert r.init()
        s = w.emb().sender(1)
        for i, (a, b) in enumerate(cuts(seq, sizes)):
            kw = {"seq_len": seq, "aux": d.aux} if i == 0 else {}
            assert give(s, d, a, b, **kw) is not FAILED
            # what was given may land; never more than was given
            w.run_until(lambda b=b: r.progress[0] == b or r.poll() is SUCCESS
                        or r.needs_resume, f"part ending at {b}")
            if r.needs_resume:
                r.resume()
            assert r.progress[0] <= b
        assert w.finish(r, "the room") is SUCCESS, r.failure
        assert mismatches(r.result(), d) == []
        assert w.ended(s, "the sender") is SUCCESS
        w.settle_whole()


@pytest.mark.parametrize("recv_into", ["output", "pool"])
def test_parts_given_already_coalesce_into_one_chunk(recv_into: str) -> None:
    """Three parts given before the allocation comes: one chunk carries all of
    them (a segment across parts is joined), not one chunk and a resume per
    part (issue 25 item 4: about two resumes saved per three-part room)."""
    with World(cfg(recv_into, first=8 * BS)) as w:
        d = room_data(w.cfg, 3, 100)
        s = w.emb().sender(3)
        for i, (a, b) in enumerate(cuts(100, [30, 40, 30])):
            give(s, d, a, b, **({"seq_len": 100, "aux": d.aux} if i == 0 else {}))
        r = w.lang().receiver(3, src_rank=EMB)
        assert r.init()
        assert w.finish(r, "the room") is SUCCESS, r.failure
        assert mismatches(r.result(), d) == []
        assert w.ended(s, "the sender") is SUCCESS  # then its counters are final
        assert w.counter(EMB, "chunks") == 1 and w.counter(1, "resumes") == 0
        assert [m.num_tokens for m in w.link().metas()] == [100]
        w.settle_whole()


def test_the_prefix_grows_as_parts_are_given() -> None:
    with World(cfg(first=4 * BS), auto_control=True) as w:
        d = room_data(w.cfg, 2, 4 * BS)
        r = w.lang().receiver(2, src_rank=EMB)
        assert r.init(seq_len=4 * BS)  # the whole room's space at once
        s = w.emb().sender(2)
        for i, (a, b) in enumerate(cuts(4 * BS, [BS] * 4)):
            give(s, d, a, b, **({"seq_len": 4 * BS} if i == 0 else {}))
            w.run_until(lambda b=b: r.progress[0] == b, f"{b} tokens landed")
            p = r.prefix()
            assert p.embeddings.shape[0] == b
            assert mismatches_prefix(p, d, b) == []
        assert w.ended(r, "the room") is SUCCESS
        w.settle_whole()


def mismatches_prefix(p: Any, d: RoomData, n: int) -> list[str]:
    import torch
    bad = []
    if not torch.equal(p.embeddings.view(torch.int16), d.embeddings[:n].view(torch.int16)):
        bad.append("embeddings")
    if not torch.equal(p.fill_ids, d.fill_ids[:n]):
        bad.append("fill_ids")
    return bad


def test_misuse_is_a_value_error_and_the_room_untouched() -> None:
    with World(cfg(), auto_control=True) as w:
        d = room_data(w.cfg, 3, 60)
        s = w.emb().sender(3)
        with pytest.raises(ValueError, match="seq_len=10 must be an int >= the 20 tokens"):
            give(s, d, 0, 20, seq_len=10)
        give(s, d, 0, 20, seq_len=60, aux=d.aux)
        with pytest.raises(ValueError, match="aux and seq_len go with the first part only"):
            give(s, d, 20, 40, aux=(1,))
        with pytest.raises(ValueError, match="aux and seq_len go with the first part only"):
            give(s, d, 20, 40, seq_len=60)
        with pytest.raises(ValueError, match="would sum to 70 tokens, past seq_len=60"):
            give(s, d, 10, 60)  # 50 more tokens after 20
        give(s, d, 20, 60)
        with pytest.raises(ValueError, match="send\\(\\) was already called for all 60"):
            give(s, d, 0, 1)
        r = w.lang().receiver(3, src_rank=EMB)
        assert r.init()
        assert w.finish(r, "the room") is SUCCESS
        assert mismatches(r.result(), d) == []
        w.settle_whole()


def first_part_landed(w: World, room: int, seq: int = 100,
                      first: int = 30) -> tuple[RoomData, Any, Any]:
    """A room of `seq` tokens whose first part (`first` tokens) was given and has
    landed; the rest not given yet. (data, sender, receiver)."""
    d = room_data(w.cfg, room, seq)
    r = w.lang().receiver(room, src_rank=EMB)
    assert r.init()
    if not w.control.auto:
        w.deliver_all()
    s = w.emb().sender(room)
    give(s, d, 0, first, seq_len=seq)
    w.run_until(lambda: r.progress[0] == first, "the first part landed")
    return d, s, r


@pytest.mark.parametrize("side", ["embedding", "language"])
def test_abort_between_parts(side: str) -> None:
    with World(cfg(), auto_control=True) as w:
        d, s, r = first_part_landed(w, 4)
        (s if side == "embedding" else r).abort("the request was cancelled")
        assert w.ended(s, "the sender") is FAILED and w.ended(r, "the receiver") is FAILED
        assert give(s, d, 30, 60) is FAILED  # a part after the abort: nothing taken
        w.settle_whole()


def test_parts_that_stop_coming_fail_at_bootstrap_timeout_on_both_sides() -> None:
    with World(cfg()) as w:
        d = room_data(w.cfg, 5, 100)
        r = w.lang().receiver(5, src_rank=EMB)
        assert r.init()
        w.deliver_all()
        s = w.emb().sender(5)
        give(s, d, 0, 30, seq_len=100)
        w.run_until(lambda: r.progress[0] == 30 and w.counter(EMB, "chunks") == 1,
                    "the first part landed and counted")
        w.advance(19.0)
        assert s.poll() not in (SUCCESS, FAILED)
        w.advance(3.0)
        assert w.ended(s, "the sender") is FAILED and "next part" in (s.failure or "")
        assert w.ended(r, "the receiver") is FAILED
        w.settle_whole()


@pytest.mark.parametrize("dead", ["embedding", "language"])
def test_peer_death_between_parts(dead: str) -> None:
    """A rank dies (its links break, its messages stop) after the first part:
    the survivor's room fails naming the peer, and its pool is whole."""
    with World(cfg()) as w:
        d, s, r = first_part_landed(w, 6, first=40)
        lang = w.topology.language_ranks[0]
        w.kill(EMB if dead == "embedding" else lang)
        survivor = r if dead == "embedding" else s
        w.advance(5.0)  # past peer_timeout: the silence is noticed
        assert w.ended(survivor, "the survivor's room") is FAILED
        assert survivor.failure is not None and ("down" in survivor.failure or "lost" in survivor.failure), survivor.failure
        if dead == "language":
            assert give(s, d, 40, 100) is FAILED  # the next part: nothing taken
        w.close(check=False)  # a dead rank leaves no goodbye
        e_or_l = w.lang() if dead == "embedding" else w.emb()
        free = (e_or_l.pool.allocator.num_free if dead == "embedding"
                else e_or_l.budget.num_free)
        total = (e_or_l.pool.allocator.num_blocks if dead == "embedding"
                 else e_or_l.budget.num_blocks)
        assert free == total


def test_shutdown_with_a_half_given_room() -> None:
    with World(cfg(), auto_control=True) as w:
        _, s, r = first_part_landed(w, 7)
        w.emb().close(5.0)
        assert w.ended(s, "the sender") is FAILED and "shut down" in (s.failure or "")
        assert w.ended(r, "the receiver") is FAILED
        assert w.emb().budget.num_free == w.emb().budget.num_blocks
        w.run_until(lambda: w.lang().pool.allocator.num_free == w.lang().pool.allocator.num_blocks,
                    "the Language pool whole")
        w.close(check=False)  # the Embedding engine is already closed


@pytest.mark.parametrize("tp", [2, 3])
def test_parts_to_a_tp_instance_whose_ranks_chunk_differently(tp: int) -> None:
    """Every rank of a TP-2 / TP-3 instance receives the whole room, each in
    its own chunks (pools of 2, 5 and 32 blocks), parts of uneven sizes."""
    pools = [2, 5, 32][:tp]
    ranks = list(range(1, 1 + tp))
    with World(cfg(first=2 * BS, language_tp_size=tp), auto_control=True,
               per_rank={rank: {"num_blocks": n} for rank, n in zip(ranks, pools, strict=True)}
               ) as w:
        d = room_data(w.cfg, 8, 200)
        rs = [w.lang(rank).receiver(8, src_rank=EMB) for rank in ranks]
        for r in rs:
            assert r.init()
        s = w.emb().sender(8)
        for i, (a, b) in enumerate(cuts(200, [7, 50, 1, 90])):
            give(s, d, a, b, **({"seq_len": 200, "aux": d.aux} if i == 0 else {}))
        for r in rs:
            assert w.finish(r, f"rank {r}") is SUCCESS, r.failure
            assert mismatches(r.result(), d) == []
        assert w.ended(s, "the sender") is SUCCESS
        chunks = [w.counter(rank, "chunks") for rank in ranks]
        # each rank chunked it its own way: the smallest pool in the most chunks
        # (how many exactly depends on whether a RESUME found the whole room given,
        # when it is pre-posted and not cut at part ends)
        assert chunks[0] > chunks[-1] and chunks[0] >= 200 // (2 * BS), chunks
        w.settle_whole()
