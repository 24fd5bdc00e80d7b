"""In-process layer: one pair's stream and the order of things on it.

Ported from test_transfer.py, made exact: frames of many rooms leave on one
pair in the order their allocations are served, chunk after chunk in step
with the plan (offsets, flags, sizes, aux); no post on a stream is made under
an engine lock; ALLOC before sender() and sender() before ALLOC both work;
an ABORT that comes before sender() makes that sender start FAILED; a RESUME
repeated (by the caller, or on the wire) is served once; 64 rooms go through
a small pool with `RoomQueue`; SUCCESS is published only after the room's
blocks are back. Every result is compared bit for bit with what was sent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from disagg import wire
from disagg.config import DisaggConfig
from disagg.embedding import Sender
from disagg.errors import PoolFull
from disagg.language import Receiver
from disagg.meta import FrameKind
from disagg.queue import RoomQueue
from disagg.types import TransferStatus

from .fakes import TERMINAL, Envelope, RecvInto, Where, World
from .rooms import RoomData, mismatches, room_data, send

pytestmark = pytest.mark.timeout(60)

SUCCESS, FAILED = TransferStatus.SUCCESS, TransferStatus.FAILED
HIDDEN = 64
BS = 16
FIRST = 40  # default_alloc_tokens: 3 blocks = 48 tokens
EMB, LANG = 0, 1
DEEPSTACK: dict[str, tuple[tuple[int, ...], str]] = {"deepstack": ((3, 8), "bfloat16")}


def std_cfg(recv_into: RecvInto = "output", auto_resume: bool = True,
            **kw: Any) -> DisaggConfig:
    return DisaggConfig(hidden_size=HIDDEN, block_size=BS, num_blocks=64,
                        default_alloc_tokens=FIRST, recv_into=recv_into, auto_resume=auto_resume,
                        extra_buffers=DEEPSTACK, bootstrap_timeout=20.0,
                        peer_timeout=5.0).replace(**kw)


def expected_chunks(seq: int, first_tokens: int, pool_blocks: int) -> list[int]:
    """Chunk sizes the spec implies: whole-block allocations, never more than the
    pool nor the rest of the room; each chunk min(remaining, allocated)."""
    chunks: list[int] = []
    allocated = min(math.ceil(first_tokens / BS), pool_blocks) * BS
    while True:
        chunks.append(min(seq - sum(chunks), allocated))
        rest = seq - sum(chunks)
        if rest == 0:
            return chunks
        allocated = min(math.ceil(rest / BS), pool_blocks) * BS


@dataclass
class Rooms:
    """Rooms of one test, both ends: data, senders, receivers."""

    w: World
    data: dict[int, RoomData]
    senders: dict[int, Sender]
    receivers: dict[int, Receiver]

    @classmethod
    def make(cls, w: World, seqs: dict[int, int]) -> Rooms:
        return cls(w, {room: room_data(w.cfg, room, seq) for room, seq in seqs.items()}, {}, {})

    def send_all(self) -> None:
        for room, d in self.data.items():
            self.senders[room] = self.w.emb().sender(room)
            send(self.senders[room], d)

    def init_all(self, num_tokens: int | None = None) -> None:
        for room in self.data:
            r = self.receivers[room] = self.w.lang().receiver(room, src_rank=EMB)
            assert r.init(num_tokens), f"room {room}: no blocks in an idle pool"

    def finish(self) -> None:
        """Every room SUCCESS on both sides, bit-exact."""
        for room, r in self.receivers.items():
            assert self.w.finish(r, f"room {room}") is SUCCESS, r.failure
            assert mismatches(r.result(), self.data[room]) == []
        for room, s in self.senders.items():
            assert self.w.ended(s, f"sender {room}") is SUCCESS, s.failure


def assert_counts(w: World, chunks: int, resumes: int) -> None:
    """Both sides counted the chunks and resumes the spec implies, and no failure."""
    for rank in (EMB, LANG):
        snap = w.snapshot(rank)
        assert (snap["chunks"], snap["resumes"], snap["failures"]) == (chunks, resumes, 0), (
            rank, snap)
    assert w.counter(EMB, "bytes_sent") == w.counter(LANG, "bytes_received") > 0


# -- frames on one pair ----------------------------------------------------


def alloc_of(room: int) -> Where:
    """Picks the ALLOC of `room` out of the control queue."""
    def where(e: Envelope) -> bool:
        msg = e.msg
        return isinstance(msg, wire.Alloc) and msg.room == room
    return where


@pytest.mark.parametrize("recv_into", ["pool", "output"])
@pytest.mark.parametrize("auto_resume", [True, False], ids=["auto", "manual"])
def test_frames_of_many_rooms_leave_in_the_order_their_allocations_are_served(
        recv_into: RecvInto, auto_resume: bool) -> None:
    seqs = {100 + i: seq for i, seq in enumerate([1, 47, 48, 49, 100, 300, 16, 17, 200, 5])}
    with World(std_cfg(recv_into, auto_resume)) as w:
        rooms = Rooms.make(w, seqs)
        rooms.send_all()
        rooms.init_all()
        order = [105, 101, 109, 100, 108, 102, 107, 103, 106, 104]  # not the order of init()
        for room in order:  # one ALLOC at a time: its chunk 0 is scheduled at once
            assert w.control.deliver(1, where=alloc_of(room)) == 1
        rooms.finish()
        metas = w.link().metas()
        assert [m.room for m in metas[:len(order)]] == order
        assert all(m.kind is FrameKind.DATA for m in metas)
        token_nbytes = sum(b.token_nbytes for b in w.lang().geometry.wire_buffers)
        for room, seq in seqs.items():  # each room's frames: in step with the plan
            frames = [f for f in w.link().frames if f.meta.room == room]
            sizes = [f.meta.num_tokens for f in frames]
            assert sizes == expected_chunks(seq, FIRST, 64), (room, sizes)
            for i, f in enumerate(frames):
                m = f.meta
                assert (m.chunk_index, m.token_offset, m.seq_len) == (i, sum(sizes[:i]), seq)
                assert (m.first, m.last) == (i == 0, i == len(frames) - 1)
                assert m.aux == rooms.data[room].aux
                assert sum(f.payload_nbytes) == m.num_tokens * token_nbytes
        total = sum(len(expected_chunks(s, FIRST, 64)) for s in seqs.values())
        assert len(metas) == total
        assert_counts(w, total, total - len(seqs))
        w.assert_whole()


@pytest.mark.parametrize("recv_into", ["pool", "output"])
@pytest.mark.parametrize("auto_resume", [True, False], ids=["auto", "manual"])
def test_posts_are_never_made_under_the_engine_lock(recv_into: RecvInto, auto_resume: bool) -> None:
    """Every post of both ends (frames; meta and payload recvs) is made without
    the engine lock: a Gloo post can wait for the pair's busy socket."""
    with World(std_cfg(recv_into, auto_resume)) as w:
        rooms = Rooms.make(w, {200 + i: s for i, s in enumerate([30, 100, 260, 7, 190])})
        rooms.init_all()  # ALLOCs first for some rooms ...
        w.deliver_all()
        rooms.send_all()  # ... so frames are posted from send() and from on_message()
        rooms.finish()
        link = w.link()
        by_side = {side: [p for p in link.posts if p.side == side]
                   for side in ("embedding", "language")}
        assert len(by_side["embedding"]) > 5 and len(by_side["language"]) > 5, by_side
        assert {p.op for p in by_side["language"]} == {"post_meta_recv", "post_recv"}
        assert link.posts_under_lock() == []


# -- which side comes first ------------------------------------------------

ORDER_SEQS = {300: 1, 301: 48, 302: 49, 303: 300}  # 1 + 1 + 2 + 2 chunks


@pytest.mark.parametrize("recv_into", ["pool", "output"])
@pytest.mark.parametrize("auto_resume", [True, False], ids=["auto", "manual"])
def test_alloc_before_sender(recv_into: RecvInto, auto_resume: bool) -> None:
    """Every ALLOC reached the Embedding rank before its sender() existed."""
    with World(std_cfg(recv_into, auto_resume)) as w:
        rooms = Rooms.make(w, ORDER_SEQS)
        rooms.init_all()
        assert {r.poll() for r in rooms.receivers.values()} == {TransferStatus.WAITING_FOR_INPUT}
        w.deliver_all()  # every ALLOC is in, no sender yet
        rooms.send_all()
        after = {s.poll() for s in rooms.senders.values()}
        assert after <= {TransferStatus.TRANSFERRING, SUCCESS}, after
        rooms.finish()
        assert_counts(w, chunks=6, resumes=2)


@pytest.mark.parametrize("recv_into", ["pool", "output"])
@pytest.mark.parametrize("auto_resume", [True, False], ids=["auto", "manual"])
def test_data_before_alloc(recv_into: RecvInto, auto_resume: bool) -> None:
    with World(std_cfg(recv_into, auto_resume)) as w:
        rooms = Rooms.make(w, ORDER_SEQS)
        rooms.send_all()
        # no ALLOC can have arrived: neither finished nor failed
        assert not {s.poll() for s in rooms.senders.values()} & {SUCCESS, FAILED}
        rooms.init_all()
        rooms.finish()
        assert_counts(w, chunks=6, resumes=2)


def test_abort_before_sender_with_an_early_alloc() -> None:
    """ALLOC, then ABORT, both before sender(): the ALLOC is answered (the blocks
    come back), and the sender made later starts FAILED and takes no budget."""
    with World(std_cfg()) as w:
        r = w.lang().receiver(400, src_rank=EMB)
        assert r.init()
        w.deliver_all()
        r.abort("caller gave up early")
        w.deliver_all()
        w.settle_whole("after the early ABORT was answered")
        s = w.emb().sender(400)
        assert s.poll() is FAILED
        assert s.failure is not None and "language rank 1" in s.failure
        assert "caller gave up early" in s.failure
        send(s, room_data(w.cfg, 400, 50))  # a no-op: no budget taken, no frame
        assert w.emb().budget.num_free == w.emb().budget.num_blocks
        assert w.causes(EMB) == {"abort": 1} and w.causes(LANG) == {"abort": 1}
        assert [m.kind for m in w.link().metas()] == [FrameKind.ABORT]
        assert_fresh_room_succeeds(w, 401)


def test_abort_before_sender_without_alloc() -> None:
    """A receiver aborted before init(): its ABORT comes before anything else."""
    with World(std_cfg()) as w:
        r = w.lang().receiver(410, src_rank=EMB)
        r.abort("never mind")
        w.deliver_all()
        s = w.emb().sender(410)
        assert s.poll() is FAILED and s.failure is not None and "never mind" in s.failure
        assert w.link().metas() == []
        w.assert_whole()
        assert_fresh_room_succeeds(w, 411)


def assert_fresh_room_succeeds(w: World, room: int, seq: int = 70) -> None:
    d = room_data(w.cfg, room, seq)
    s = w.emb().sender(room)
    send(s, d)
    r = w.lang().receiver(room, src_rank=EMB)
    assert r.init()
    assert w.finish(r, f"room {room}") is SUCCESS, r.failure
    assert mismatches(r.result(), d) == []
    assert w.ended(s, f"sender {room}") is SUCCESS
    w.settle_whole(f"after room {room}")


# -- resume is keyed by sent_tokens ---------------------------------------


@pytest.mark.parametrize("recv_into", ["pool", "output"])
def test_repeated_resume_is_served_once(recv_into: RecvInto) -> None:
    """Manual mode: resume() called again and again in one round sends one
    RESUME; a RESUME repeated on the wire (same room, pair and sent_tokens) is
    ignored by the Embedding rank. Exactly one chunk per round."""
    seq = 7 * BS + 3
    with World(std_cfg(recv_into, auto_resume=False)) as w:
        d = room_data(w.cfg, 500, seq)
        s = w.emb().sender(500)
        send(s, d)
        r = w.lang().receiver(500, src_rank=EMB)
        assert r.init(BS)
        rounds = 0
        while r.poll() is not SUCCESS:
            w.run_until(lambda: r.needs_resume or r.poll() in TERMINAL, f"round {rounds}")
            if r.poll() is SUCCESS:
                break
            for _ in range(5):
                assert r.resume(BS)
                _ = r.poll(), r.needs_resume, r.progress
            resumes = w.control.pending(lambda e: isinstance(e.msg, wire.Resume))
            assert len(resumes) == 1, resumes
            w.control.inject(LANG, EMB, resumes[0].payload)  # the same RESUME, twice
            rounds += 1
        assert rounds == 7
        assert mismatches(r.result(), d) == []
        assert w.ended(s, "sender") is SUCCESS
        assert_counts(w, chunks=8, resumes=7)
        assert [m.num_tokens for m in w.link().metas()] == [BS] * 7 + [3]


# -- many rooms through a small pool ---------------------------------------


@pytest.mark.parametrize(("recv_into", "auto_resume"), [("pool", True), ("output", False)])
def test_concurrent_rooms_through_a_small_pool_with_the_queue(recv_into: RecvInto,
                                                              auto_resume: bool) -> None:
    """64 rooms of random lengths, an 8-block Language pool and a 40-block
    Embedding budget: the Embedding side sends in order as the budget allows
    (PoolFull: retry later), the Language side adds every room to a RoomQueue
    and steps it. Every room done once, bit-exact; both sides ran out."""
    g = torch.Generator().manual_seed(1234)
    seqs = dict(enumerate(torch.randint(1, 151, (64,), generator=g).tolist(), start=600))
    cfg = std_cfg(recv_into, auto_resume, default_alloc_tokens=32)
    with World(cfg, embedding_blocks=40, language_blocks=8) as w:
        data = {room: room_data(cfg, room, seq) for room, seq in seqs.items()}
        q = RoomQueue(w.lang(), None)
        for room in seqs:
            q.add(room, src_rank=EMB)
        todo = list(seqs)
        live: dict[int, Sender] = {}
        got: list[int] = []
        pool_full = 0
        deadline = time.monotonic() + 20
        while len(got) < len(seqs):
            while todo:  # strictly in order, as the budget allows
                s = live.get(todo[0]) or w.emb().sender(todo[0])
                live[todo[0]] = s
                try:
                    send(s, data[todo[0]])
                except PoolFull:
                    pool_full += 1
                    break
                todo.pop(0)
            done, failed = q.step()
            assert failed == [], failed
            for room, res in done:
                assert mismatches(res, data[room]) == []
                got.append(room)
            for room in [room for room, s in live.items() if s.poll() in TERMINAL]:
                assert live.pop(room).poll() is SUCCESS
            assert time.monotonic() < deadline, f"{len(got)} done; {w.describe()}"
            seen = w.activity.generation
            w.deliver_all()
            w.activity.wait_change(seen, 0.002)
        assert sorted(got) == sorted(seqs) and len(got) == len(set(got))
        assert len(q) == 0 and q.step() == ([], [])
        assert pool_full > 0, "the Embedding budget never ran out: the test is too easy"
        assert w.causes(EMB) == w.causes(LANG) == {}
        assert w.counter(EMB, "bytes_sent") == w.counter(LANG, "bytes_received")
        w.run_until(lambda: not live or all(s.poll() is SUCCESS for s in live.values()),
                    "the last senders")
        w.settle_whole()


# -- SUCCESS only after the books are closed -------------------------------


def test_success_is_published_after_blocks_and_room_are_returned() -> None:
    """Tiny rooms one after another: the moment a side sees SUCCESS (woken by
    its wait(), the earliest a caller can know), its stats already show the
    blocks back and the room gone. Every gauge update is slowed, so bookkeeping
    done after the status is published would be seen."""
    with World(std_cfg()) as w:
        for stats in w.stats.values():
            real = stats.set_gauge

            def slow(name: str, value: int, real: Callable[[str, int], None] = real) -> None:
                time.sleep(0.001)
                real(name, value)

            stats.set_gauge = slow  # type: ignore[method-assign]
        lags = []
        for i in range(9):
            room, seq = 700 + i, 1 + i % 3
            d = room_data(w.cfg, room, seq)
            s = w.emb().sender(room)
            send(s, d)
            r = w.lang().receiver(room, src_rank=EMB)
            assert r.init()
            w.deliver_all()
            for rank, handle in ((LANG, r), (EMB, s)):
                assert handle.wait(5.0) is SUCCESS, handle.failure
                snap = w.snapshot(rank)
                if snap["pool_free_blocks"] != snap["pool_total_blocks"] or snap["rooms_live"]:
                    lags.append((i, rank, snap["pool_free_blocks"], snap["rooms_live"]))
            assert mismatches(r.result(), d) == []
        assert lags == [], f"SUCCESS seen before the books were closed: {lags}"
