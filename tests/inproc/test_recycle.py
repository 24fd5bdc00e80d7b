"""In-process layer: results handed back (`ctx.language.recycle`) and reused.

A room's result lands in new memory, which faults once per 4 KiB where glibc
gave it back to the kernel. A caller that hands a result back lets later rooms
land in its memory instead (`disagg/recycle.py`). Checked here: the memory is
reused (same address), results stay bit-exact after reuse, the idle memory is
bounded, a set is never given to two live rooms (nor while the caller still
views it), bad hand-backs are refused with the reason, and fanout="scatter"
keeps its T x ceil(seq / T) rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from disagg.config import DisaggConfig
from disagg.errors import DisaggError
from disagg.language import LanguageEngine, Receiver
from disagg.language_side import LanguageSide
from disagg.queue import RoomQueue
from disagg.recycle import MAX_IDLE_BYTES, MAX_SLACK, bucket
from disagg.types import EmbeddingResult, TransferStatus

from .fakes import World
from .rooms import (
    RoomData,
    gather_by_hand,
    mismatches,
    receive,
    receive_everywhere,
    room_data,
    send,
)

pytestmark = pytest.mark.timeout(60)

SUCCESS = TransferStatus.SUCCESS
EMB, HIDDEN, BS = 0, 32, 8


def cfg(**kw: Any) -> DisaggConfig:
    return DisaggConfig(hidden_size=HIDDEN, block_size=BS, num_blocks=64,
                        default_alloc_tokens=512,
                        extra_buffers={"deepstack": ((2, 4), "bfloat16")}).replace(**kw)


def ptr(res: EmbeddingResult) -> int:
    return res.embeddings.untyped_storage().data_ptr()


def counters(eng: LanguageEngine) -> tuple[int, int]:
    s = eng.stats.snapshot()
    return int(s["results_recycled"]), int(s["results_reused"])  # type: ignore[call-overload]


@pytest.mark.parametrize("recv_into", ["output", "pool"])
def test_handed_back_memory_is_reused_and_results_stay_exact(recv_into: str) -> None:
    with World(cfg(recv_into=recv_into), auto_control=True) as w:
        side = LanguageSide(w.lang(), None)
        r, d = receive(w, 1, 40)
        res = r.result()
        assert mismatches(res, d) == []
        first = ptr(res)
        extra = res.extra["deepstack"].untyped_storage().data_ptr()
        side.recycle(res)
        del res  # the caller lets go of the tensors
        assert counters(w.lang()) == (1, 0)
        assert side.engine.recycler.idle_bytes > 0
        # the old room's result is gone for good, whole or in part
        with pytest.raises(DisaggError, match="handed back"):
            r.result()
        with pytest.raises(DisaggError, match="handed back"):
            r.prefix(3)
        # shorter rooms fit (within MAX_SLACK): same memory, every bit right
        for room, seq in ((2, 40), (3, 33), (4, 21)):
            r2, d2 = receive(w, room, seq)
            res2 = r2.result()
            assert ptr(res2) == first and res2.extra["deepstack"].untyped_storage().data_ptr() \
                == extra, room
            assert mismatches(res2, d2) == []
            side.recycle(res2)
            del res2
        assert counters(w.lang()) == (4, 3)
        # a room of 41 tokens does not fit a set of 40 rows: new memory
        r3, d3 = receive(w, 5, 41)
        assert mismatches(r3.result(), d3) == []
        assert ptr(r3.result()) != first and counters(w.lang())[1] == 3
        w.settle_whole()


def test_queue_results_hand_back_and_are_reused() -> None:
    """The serving-loop way: step()'s results, handed back after prefill."""
    with World(cfg(), auto_control=True) as w:
        side = LanguageSide(w.lang(), None)
        q = RoomQueue(w.lang(), None)
        seen: set[int] = set()
        for room, seq in zip(range(10, 16), (32, 30, 31, 32, 29, 30), strict=True):
            d = room_data(w.cfg, room, seq)
            send(w.emb().sender(room), d)
            q.add(room, src_rank=EMB)
            done = w.run_until(lambda: q.step()[0], f"room {room} done")
            ((got, res),) = done
            assert got == room and mismatches(res, d) == []
            seen.add(ptr(res))
            side.recycle(res)
            del res, done
        assert len(seen) == 1  # every room after the first landed in the first's memory
        assert counters(w.lang()) == (6, 5)
        w.settle_whole()


def test_a_view_still_held_keeps_its_memory_out_of_reuse() -> None:
    """Handed back while the caller still holds one of its tensors: nothing
    lands in that memory until the caller lets go."""
    with World(cfg(), auto_control=True) as w:
        side = LanguageSide(w.lang(), None)
        r, _ = receive(w, 1, 40)
        res = r.result()
        kept = res.embeddings[:5]
        before = kept.clone()
        side.recycle(res)
        del res
        r2, d2 = receive(w, 2, 40)
        assert ptr(r2.result()) != kept.untyped_storage().data_ptr()
        assert torch.equal(kept.view(torch.int16), before.view(torch.int16))
        assert mismatches(r2.result(), d2) == []
        old = kept.untyped_storage().data_ptr()
        del kept
        r3, d3 = receive(w, 3, 40)
        assert ptr(r3.result()) == old and mismatches(r3.result(), d3) == []
        w.settle_whole()


def test_bad_hand_backs_are_value_errors() -> None:
    with World(cfg(auto_resume=False), instances=2, auto_control=True) as w:
        lang_a, lang_b = w.topology.language_ranks
        side = LanguageSide(w.lang(lang_a), None)
        r, _ = receive(w, 1, 40, lang_a)
        res = r.result()
        with pytest.raises(ValueError, match="prefix view"):
            side.recycle(r.prefix(5))  # a room's prefix: a view, not its result
        with pytest.raises(ValueError, match="prefix view"):
            side.recycle(dataclasses.replace(res))  # a copy of the result object
        with pytest.raises(ValueError, match="EmbeddingResult"):
            side.recycle(res.embeddings)  # type: ignore[arg-type]
        foreign = EmbeddingResult(torch.zeros(4, HIDDEN, dtype=torch.bfloat16),
                                  torch.zeros(4, dtype=torch.int32), None)
        with pytest.raises(ValueError, match="not a result received on this language rank"):
            side.recycle(foreign)
        other, _ = receive(w, 2, 40, lang_b)  # another Language instance's rank
        with pytest.raises(ValueError, match="not a result received on this language rank"):
            side.recycle(other.result())
        # a room still landing: its prefix is refused too
        d3 = room_data(w.cfg, 3, 50)
        r3 = w.lang(lang_a).receiver(3, src_rank=EMB)
        assert r3.init(num_tokens=BS)
        s3 = w.emb().sender(3)
        send(s3, d3)
        w.run_until(lambda: r3.needs_resume, "room 3's first chunk")
        assert r3.progress[0] == BS
        with pytest.raises(ValueError, match="prefix view"):
            side.recycle(r3.prefix())
        assert w.finish(r3, "room 3") is SUCCESS and w.ended(s3, "sender 3") is SUCCESS
        side.recycle(res)
        assert counters(w.lang(lang_a)) == (1, 0)
        with pytest.raises(ValueError, match="already handed back"):
            side.recycle(res)
        assert mismatches(r3.result(), d3) == []  # refusals changed nothing
        assert counters(w.lang(lang_a)) == (1, 0)
        w.settle_whole()


def test_idle_memory_is_bounded() -> None:
    with World(cfg(), auto_control=True) as w:
        side = LanguageSide(w.lang(), None)
        rec = w.lang().recycler
        assert side.recycle_limit_bytes == MAX_IDLE_BYTES
        for bad in (-1, 1.5, True, "1"):
            with pytest.raises(ValueError, match="recycle_limit_bytes"):
                side.recycle_limit_bytes = bad  # type: ignore[assignment]
        rs = [receive(w, room, 32)[0] for room in range(1, 5)]
        results = [r.result() for r in rs]
        one = rec._issued[id(results[0])].bufs.nbytes
        side.recycle_limit_bytes = 2 * one + one // 2  # room for two sets
        ptrs = [ptr(x) for x in results]
        for x in results:
            side.recycle(x)
        del results, x
        assert rec.idle_sets == 2 and rec.idle_bytes == 2 * one <= side.recycle_limit_bytes
        assert w.lang().stats.snapshot()["recycle_idle_bytes"] == 2 * one
        # the two handed back last are kept: the oldest went first
        got = {ptr(receive(w, room, 32)[0].result()) for room in (5, 6)}
        assert got == set(ptrs[2:])
        side.recycle_limit_bytes = one - 1  # a set larger than the bound is not kept
        r7, _ = receive(w, 7, 32)
        side.recycle(r7.result())
        assert rec.idle_sets == 0 and rec.idle_bytes == 0
        side.recycle_limit_bytes = 0  # keeps none
        assert rec.idle_bytes == 0
        w.settle_whole()


def test_best_fit_and_small_rooms_do_not_pin_large_sets() -> None:
    with World(cfg(), auto_control=True) as w:
        side = LanguageSide(w.lang(), None)
        big, small = (receive(w, room, seq)[0].result() for room, seq in ((1, 200), (2, 40)))
        p_big, p_small = ptr(big), ptr(small)
        side.recycle(big)
        side.recycle(small)
        del big, small
        r, d = receive(w, 3, 30)  # both fit; the smaller is best
        assert ptr(r.result()) == p_small and mismatches(r.result(), d) == []
        assert MAX_SLACK * bucket(10) < 200
        r, d = receive(w, 4, 10)  # the 200-row set is too large for 10 tokens
        assert ptr(r.result()) != p_big and mismatches(r.result(), d) == []
        r, d = receive(w, 5, 150)
        assert ptr(r.result()) == p_big and mismatches(r.result(), d) == []
        w.settle_whole()


def test_new_sets_are_rounded_up_once_recycling_is_in_use() -> None:
    assert [bucket(n) for n in (1, 16, 17, 100, 128, 129, 2000, 2048)] == [
        16, 16, 20, 112, 128, 160, 2048, 2048]
    with World(cfg(), auto_control=True) as w:
        side = LanguageSide(w.lang(), None)
        r1, _ = receive(w, 1, 100)
        assert r1._r.buffers is not None and r1._r.buffers.rows == 100  # exact until then
        side.recycle(r1.result())
        r2, d2 = receive(w, 2, 129)  # too large for 100 rows: a new set, rounded up
        assert r2._r.buffers is not None and r2._r.buffers.rows == 160
        assert r2.result().embeddings.shape == (129, HIDDEN)
        assert mismatches(r2.result(), d2) == []
        w.settle_whole()


def test_a_set_is_never_given_to_two_live_rooms() -> None:
    """Rooms of mixed lengths in flight while others are handed back as they
    finish: no two live rooms ever share a set, and every result is still
    exact when it is handed back, after later rooms landed."""
    with World(cfg(), embedding_blocks=4096, language_blocks=4096, auto_control=True) as w:
        side = LanguageSide(w.lang(), None)
        live: dict[int, tuple[Receiver, RoomData]] = {}
        seqs = [40, 17, 33, 40, 8, 120, 25, 39, 100, 3]
        room = 0
        reused_before = 0
        for wave in range(6):
            started = []
            for seq in seqs[wave % 3::2]:
                room += 1
                d = room_data(w.cfg, room, seq)
                r = w.lang().receiver(room, src_rank=EMB)
                assert r.init()
                send(w.emb().sender(room), d)
                started.append((r, d))
            for r, d in started:
                assert w.finish(r, f"room {r.room}") is SUCCESS, r.failure
                live[r.room] = (r, d)
                owners = [x._r.buffers for x, _ in live.values()]
                assert len({id(b) for b in owners}) == len(owners), "a set shared by live rooms"
            # hand back every other live room, oldest first, each checked first
            for key in sorted(live)[::2]:
                r, d = live.pop(key)
                assert mismatches(r.result(), d) == [], wave
                side.recycle(r.result())
        for r, d in live.values():
            assert mismatches(r.result(), d) == []
        recycled, reused = counters(w.lang())
        assert reused > reused_before and recycled > 0
        w.settle_whole()


@pytest.mark.parametrize("tp", [2, 3])
def test_scatter_keeps_its_rows_in_recycled_sets(tp: int) -> None:
    """fanout="scatter": outputs have T x ceil(seq / T) rows (the slices end to
    end), recycled or not, and the gathered result is exact either way."""
    c = DisaggConfig(hidden_size=HIDDEN, block_size=BS, num_blocks=64, default_alloc_tokens=512,
                     language_tp_size=tp, fanout="scatter")
    with World(c, embedding_blocks=256, auto_control=True) as w:
        ranks = list(w.topology.language_ranks)
        sides = [LanguageSide(w.lang(rank), None) for rank in ranks]
        firsts: list[int] = []
        for room, seq in enumerate((40, 37, 31, 40), start=1):
            rs, d = receive_everywhere(w, room, seq)
            rows = tp * -(-seq // tp)
            for rank, r in zip(ranks, rs, strict=True):
                assert w.lang(rank).output_rows(seq) == rows
                assert r._r.outputs is not None
                assert all(t.shape[0] == rows and t.is_contiguous()
                           for t in r._r.outputs.values())
            gather_by_hand(rs)
            results = [r.result() for r in rs]
            for res in results:
                assert mismatches(res, d) == []
            if room == 1:
                firsts = [ptr(res) for res in results]
            else:  # every rank landed in its own first room's memory
                assert [ptr(res) for res in results] == firsts
            for side, res in zip(sides, results, strict=True):
                side.recycle(res)
            del results, res  # every tensor let go of: reusable
        w.settle_whole()
