"""In-process layer: abort at every state of a room, from each side.

Ported from test_faults.py (section 1), with the interleavings chosen by the
test instead of hoped for: control messages wait until delivered, and a
gated link holds each frame until released, so "the meta landed but not its
payload" or "the RESUME is in flight when the Embedding side aborts" are
states the test sets up exactly, in both landing modes (pool and output).

Each case aborts room A in one state, waits for it to end on both sides, and
checks: both FAILED with a reason naming the aborting rank and carrying the
caller's text; the exact failure causes on each side; the aborted room's
blocks held until the stream proves nothing more can land in them; the chunks
that landed. Then a fresh room B must get A's blocks (and the whole Embedding
budget, sized for one room) and arrive bit-exact: never a ghost of A. Every
pool and budget is whole at the end.

The last tests are the races of an abort with a room's *last* chunk, which
DESIGN.md decides by that chunk's own completion ("Outcomes agree").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from disagg.config import DisaggConfig
from disagg.embedding import Sender
from disagg.language import Receiver
from disagg.types import TransferStatus

from .fakes import TERMINAL, FakeLink, RecvInto, World
from .rooms import RoomData, mismatches, room_data, send

pytestmark = pytest.mark.timeout(60)

SUCCESS, FAILED = TransferStatus.SUCCESS, TransferStatus.FAILED
HIDDEN = 64
BS = 16
POOL = 8  # Language pool: 8 blocks of 16 tokens
CHUNK = POOL * BS  # 128 tokens: one chunk fills the whole pool
SEQ = 3 * CHUNK  # three chunks: the chunk in flight at an abort is never the last
BUDGET = SEQ // BS  # Embedding budget: exactly one room
A, B = 10, 11  # the aborted room, the fresh one
EMB, LANG = 0, 1
RECV_INTO: tuple[RecvInto, ...] = ("pool", "output")


def abort_cfg(recv_into: RecvInto) -> DisaggConfig:
    return DisaggConfig(hidden_size=HIDDEN, block_size=BS, num_blocks=POOL,
                        default_alloc_tokens=CHUNK, recv_into=recv_into, auto_resume=False,
                        extra_buffers={"deepstack": ((2, 8), "bfloat16")},
                        bootstrap_timeout=30.0, peer_timeout=5.0)


@dataclass
class Case:
    """Room A on its way to an abort: the handles, and what was seen on the way."""

    w: World
    side: str
    state: str
    data: RoomData
    s: Sender | None = None
    r: Receiver | None = None
    ids: list[int] = field(default_factory=list)  # blocks A held on the Language rank
    seen: dict[str, object] = field(default_factory=dict)

    @property
    def token(self) -> str:
        return f"inproc-test {self.side}/{self.state}"

    @property
    def link(self) -> FakeLink:
        return self.w.link(EMB, LANG)

    def held(self) -> int:
        return len(self.w.lang().pool.allocator.owned_by(A))

    def sender(self) -> Sender:
        self.s = self.w.emb().sender(A)
        return self.s

    def send(self) -> None:
        assert self.s is not None
        send(self.s, self.data)

    def receiver(self) -> Receiver:
        self.r = self.w.lang().receiver(A, src_rank=EMB)
        return self.r

    def init(self) -> None:
        """init() with the whole pool; the ALLOC waits in the control queue."""
        assert self.r is not None
        assert self.r.init(CHUNK), f"no blocks in an idle pool: {self.w.describe()}"
        self.ids = self.w.lang().pool.allocator.owned_by(A)

    def deliver(self) -> None:
        self.w.deliver_all()

    def partial(self) -> None:
        """Deliver the ALLOC and wait until chunk 0 landed (manual resume)."""
        assert self.r is not None
        r = self.r
        self.w.run_until(lambda: r.needs_resume or r.poll() in TERMINAL, "chunk 0 landed")
        assert r.needs_resume, f"room {A}: {r.poll().name} {r.progress} {r.failure}"

    def in_flight_frames(self, n: int) -> None:
        """The link is gated and `n` frames have been posted, none past the gate."""
        self.link.wait_frames(n)

    def meta_only(self) -> None:
        """Deliver the next frame's meta and wait until the receiver has posted
        its payload recvs: the chunk is half on the wire."""
        recvs = self.link.num_recvs
        frame = self.link.frames[-1]
        self.link.deliver(1)
        self.link.wait_recvs(recvs + len(frame.payload_nbytes))

    def abort(self) -> None:
        handle = self.r if self.side == "language" else self.s
        assert handle is not None
        handle.abort(self.token)
        self.seen["status_right_after_abort"] = handle.poll()
        self.seen["held_after_abort"] = self.held()

    def emb_not_ended(self, what: str) -> None:
        """The Embedding room may not end while a chunk of it is in flight: the
        caller could touch the tensors the send still reads."""
        assert self.s is not None
        assert self.s.poll() not in TERMINAL, f"{what}: sender {self.s.poll().name}"


# -- Language-side aborts ----------------------------------------------------


def l_before_init(c: Case) -> None:
    """Receiver made, no init(): the ABORT reaches the Embedding rank before any ALLOC."""
    c.sender()
    c.send()
    c.receiver()
    c.abort()
    c.deliver()


def l_alloc_in_transit(c: Case) -> None:
    """init() sent the ALLOC; the abort comes before it reached the Embedding rank,
    which then serves the ALLOC (chunk 0 leaves) and only then reads the ABORT."""
    c.sender()
    c.send()
    c.receiver()
    c.link.gate()
    c.init()
    c.abort()
    assert c.held() == POOL, "blocks freed before any frame answered the ALLOC"
    c.deliver()
    c.in_flight_frames(1)
    c.emb_not_ended("ABORT read while chunk 0 is in flight")
    assert c.held() == POOL, "blocks freed while chunk 0 may still land in them"
    c.link.open()


def l_waiting_no_data(c: Case) -> None:
    """The ALLOC waits at a live sender that has no data yet."""
    c.sender()
    c.receiver()
    c.init()
    c.deliver()
    c.abort()
    assert c.held() == POOL
    c.deliver()  # the Embedding rank answers the ALLOC with an ABORT frame
    c.w.settle_whole("after the ABORT frame")
    c.send()  # the caller's data comes late: a no-op on a failed room


def l_waiting_early(c: Case) -> None:
    """The ALLOC waits in the Embedding rank's early table (no sender yet); the
    sender made after the ABORT starts FAILED."""
    c.receiver()
    c.init()
    c.deliver()
    c.abort()
    c.deliver()
    c.w.settle_whole("after the ABORT frame")
    s = c.sender()
    c.seen["status_at_creation"] = s.poll()
    c.send()  # a no-op on a room that already failed


def l_chunk_in_flight(c: Case) -> None:
    """Chunk 0 is posted but nothing of it has landed."""
    c.sender()
    c.send()
    c.receiver()
    c.link.gate()
    c.init()
    c.deliver()
    c.in_flight_frames(1)
    c.abort()
    c.deliver()
    c.emb_not_ended("ABORT read while chunk 0 is in flight")
    assert c.held() == POOL, "blocks freed while chunk 0 may still land in them"
    c.link.open()


def l_meta_delivered(c: Case) -> None:
    """Chunk 0's meta has landed and its payload recvs are posted, not matched."""
    c.sender()
    c.send()
    c.receiver()
    c.link.gate()
    c.init()
    c.deliver()
    c.in_flight_frames(1)
    c.meta_only()
    c.abort()
    c.deliver()
    c.emb_not_ended("ABORT read while chunk 0's payload is in flight")
    assert c.held() == POOL, "blocks freed while chunk 0's payload lands in them"
    c.link.open()


def l_partial_landed(c: Case) -> None:
    """Chunk 0 landed; the room waits for resume() (needs_resume)."""
    c.sender()
    c.send()
    c.receiver()
    c.init()
    c.partial()
    c.abort()
    c.deliver()


def l_resume_in_flight(c: Case) -> None:
    """resume() sent the RESUME; chunk 1 is posted but held on the wire."""
    c.sender()
    c.send()
    c.receiver()
    c.init()
    c.partial()
    c.link.gate()
    assert c.r is not None and c.r.resume()
    c.deliver()
    c.in_flight_frames(2)
    c.abort()
    c.deliver()
    c.emb_not_ended("ABORT read while chunk 1 is in flight")
    c.seen["held_while_chunk_1_in_flight"] = c.held()
    c.link.open()


def after_success(c: Case) -> None:
    """The room succeeded on both sides: an abort changes nothing."""
    c.sender()
    c.send()
    c.receiver()
    c.init()
    assert c.r is not None and c.s is not None
    assert c.w.finish(c.r, f"room {A}") is SUCCESS, c.r.failure
    assert c.w.ended(c.s, f"sender {A}") is SUCCESS, c.s.failure
    c.seen["mismatches_before_abort"] = mismatches(c.r.result(), c.data)
    c.abort()
    c.deliver()


# -- Embedding-side aborts ---------------------------------------------------


def e_before_send_no_alloc(c: Case) -> None:
    """sender() made, nothing else: the room fails at once; a later ALLOC is refused."""
    c.sender()
    c.abort()
    c.receiver()
    c.init()
    c.deliver()


def e_before_send_after_alloc(c: Case) -> None:
    """The ALLOC waits at the sender for data: the abort answers it with an ABORT frame."""
    c.sender()
    c.receiver()
    c.init()
    c.deliver()
    c.abort()


def e_before_send_early_alloc(c: Case) -> None:
    """The ALLOC came before sender(): the room takes it over, then aborts."""
    c.receiver()
    c.init()
    c.deliver()
    c.sender()
    c.abort()


def e_after_send_no_alloc(c: Case) -> None:
    """Data here, no ALLOC yet: the room fails at once and gives its budget back."""
    c.sender()
    c.send()
    c.abort()
    assert c.w.emb().budget.num_free == BUDGET, "budget kept by a room that ended"
    c.receiver()
    c.init()
    c.deliver()


def e_alloc_in_transit(c: Case) -> None:
    """Data here and an ALLOC on its way: the abort comes first, the ALLOC is refused."""
    c.sender()
    c.send()
    c.receiver()
    c.init()
    c.abort()
    c.deliver()


def e_chunk_in_flight(c: Case) -> None:
    """Chunk 0 is posted, nothing landed; the REJECT reaches the Language rank
    before the chunk does (its blocks must wait for the chunk all the same)."""
    c.sender()
    c.send()
    c.receiver()
    c.link.gate()
    c.init()
    c.deliver()
    c.in_flight_frames(1)
    c.abort()
    c.emb_not_ended("aborted while chunk 0 is in flight")
    c.deliver()
    assert c.r is not None and c.r.poll() is FAILED
    assert c.held() == POOL, "blocks freed while chunk 0 may still land in them"
    c.link.open()


def e_payload_in_flight(c: Case) -> None:
    """Chunk 0's meta landed, its payload has not; then the abort and its REJECT."""
    c.sender()
    c.send()
    c.receiver()
    c.link.gate()
    c.init()
    c.deliver()
    c.in_flight_frames(1)
    c.meta_only()
    c.abort()
    c.emb_not_ended("aborted while chunk 0's payload is in flight")
    c.deliver()
    assert c.held() == POOL, "blocks freed while chunk 0's payload lands in them"
    c.link.open()


def e_between_chunks(c: Case) -> None:
    """Chunk 0 landed, no RESUME yet: the room fails at once on the Embedding rank."""
    c.sender()
    c.send()
    c.receiver()
    c.init()
    c.partial()
    c.abort()
    c.deliver()


def e_resume_in_transit(c: Case) -> None:
    """A RESUME is on its way when the Embedding side aborts: the RESUME is then
    refused with an ABORT frame (held on the wire), and the REJECT arrives first."""
    c.sender()
    c.send()
    c.receiver()
    c.init()
    c.partial()
    c.link.gate()
    assert c.r is not None and c.r.resume()
    c.abort()
    c.deliver()
    c.in_flight_frames(2)
    assert c.r.poll() is FAILED
    c.link.open()


@dataclass(frozen=True)
class Expect:
    stage: Callable[[Case], None]
    other_cause: str | None  # the one failure the other side counts (None: no failure)
    landed: int  # chunks of room A that land on the Language rank


CASES: dict[tuple[str, str], Expect] = {
    ("language", "before_init"): Expect(l_before_init, "abort", 0),
    ("language", "alloc_in_transit"): Expect(l_alloc_in_transit, "abort", 1),
    ("language", "waiting_no_data"): Expect(l_waiting_no_data, "abort", 0),
    ("language", "waiting_early_alloc"): Expect(l_waiting_early, "abort", 0),
    ("language", "chunk_in_flight"): Expect(l_chunk_in_flight, "abort", 1),
    ("language", "meta_delivered"): Expect(l_meta_delivered, "abort", 1),
    ("language", "partial_landed"): Expect(l_partial_landed, "abort", 1),
    ("language", "resume_in_flight"): Expect(l_resume_in_flight, "abort", 2),
    ("language", "after_success"): Expect(after_success, None, 3),
    ("embedding", "before_send_no_alloc"): Expect(e_before_send_no_alloc, "aborted_by_peer", 0),
    ("embedding", "before_send_after_alloc"): Expect(e_before_send_after_alloc,
                                                     "aborted_by_peer", 0),
    ("embedding", "before_send_early_alloc"): Expect(e_before_send_early_alloc,
                                                     "aborted_by_peer", 0),
    ("embedding", "after_send_no_alloc"): Expect(e_after_send_no_alloc, "aborted_by_peer", 0),
    ("embedding", "alloc_in_transit"): Expect(e_alloc_in_transit, "aborted_by_peer", 0),
    ("embedding", "chunk_in_flight"): Expect(e_chunk_in_flight, "rejected", 1),
    ("embedding", "payload_in_flight"): Expect(e_payload_in_flight, "rejected", 1),
    ("embedding", "between_chunks"): Expect(e_between_chunks, "rejected", 1),
    ("embedding", "resume_in_transit"): Expect(e_resume_in_transit, "rejected", 1),
    ("embedding", "after_success"): Expect(after_success, None, 3),
}


@pytest.fixture
def world(request: pytest.FixtureRequest) -> World:
    w = World(abort_cfg(request.param), embedding_blocks=BUDGET, language_blocks=POOL)
    request.addfinalizer(w.close)
    return w


def fresh_room(w: World, ids_aborted: list[int]) -> None:
    """Room B right after A ended: A's budget and blocks, bit-exact data."""
    data = room_data(w.cfg, B, SEQ)
    s = w.emb().sender(B)
    send(s, data)  # PoolFull here: A's budget was not returned
    r = w.lang().receiver(B, src_rank=EMB)
    w.run_until(lambda: r.init(CHUNK) or r.poll() is FAILED, f"fresh room {B}: blocks back")
    if ids_aborted:
        ids = w.lang().pool.allocator.owned_by(B)
        assert ids == ids_aborted, f"fresh room got blocks {ids}, aborted room had {ids_aborted}"
    assert w.finish(r, f"fresh room {B}") is SUCCESS, r.failure
    assert mismatches(r.result(), data) == [], "fresh room not bit-exact (a ghost of A?)"
    assert w.ended(s, f"sender {B}") is SUCCESS, s.failure


@pytest.mark.parametrize("world", RECV_INTO, indirect=True)
@pytest.mark.parametrize(("side", "state"), list(CASES))
def test_abort_then_fresh_room_on_the_same_blocks(world: World, side: str, state: str) -> None:
    w = world
    expect = CASES[(side, state)]
    c = Case(w, side, state, room_data(w.cfg, A, SEQ))
    expect.stage(c)
    emb_handle, lang_handle = c.s, c.r
    assert emb_handle is not None and lang_handle is not None, "a stage makes both ends"
    e_st = w.ended(emb_handle, f"room {A} on the embedding rank")
    l_st = w.ended(lang_handle, f"room {A} on the language rank")
    w.settle_whole(f"after room {A} ended")
    e_causes, l_causes = w.causes(EMB), w.causes(LANG)
    if expect.other_cause is None:  # after success
        assert (e_st, l_st) == (SUCCESS, SUCCESS), (emb_handle.failure, lang_handle.failure)
        assert e_causes == l_causes == {}
        assert c.seen["mismatches_before_abort"] == []
        assert mismatches(lang_handle.result(), c.data) == []  # still the room's data
    else:
        who = "language rank 1" if side == "language" else "embedding rank 0"
        for role, st, why in (("embedding", e_st, emb_handle.failure),
                              ("language", l_st, lang_handle.failure)):
            assert st is FAILED, f"{role}: aborted room ended {st.name}"
            assert why is not None and c.token in why and who in why, (
                f"{role}: reason does not carry the abort by {who} ({c.token!r}): {why!r}")
        mine, mine_causes, other_causes = ((lang_handle, l_causes, e_causes)
                                           if side == "language"
                                           else (emb_handle, e_causes, l_causes))
        assert mine.failure is not None and f"aborted on {who}" in mine.failure, mine.failure
        assert mine_causes == {"abort": 1}, mine_causes
        assert other_causes == {expect.other_cause: 1}, other_causes
        assert c.seen["status_right_after_abort"] is not SUCCESS
    if side == "language" and state in ("alloc_in_transit", "chunk_in_flight", "meta_delivered"):
        assert c.seen["held_after_abort"] == POOL, "blocks freed before the chunk landed"
    if state == "resume_in_flight":  # pool mode: credit blocks; output mode: none needed
        assert c.seen["held_while_chunk_1_in_flight"] == (POOL if w.cfg.recv_into == "pool"
                                                          else 0)
    if state == "waiting_early_alloc":
        assert c.seen["status_at_creation"] is FAILED
    assert w.counter(LANG, "chunks") == expect.landed, "chunks of A that landed"
    fresh_room(w, c.ids)
    assert w.counter(LANG, "chunks") == expect.landed + 3
    assert w.counter(EMB, "bytes_sent") <= w.counter(LANG, "bytes_received")
    w.settle_whole("at the end")


# -- an abort racing a room's last chunk ------------------------------------


def last_chunk_in_flight(w: World) -> tuple[Sender, Receiver, RoomData]:
    """A one-chunk room whose only (so last) chunk is posted and held on the wire."""
    data = room_data(w.cfg, A, CHUNK)
    s = w.emb().sender(A)
    send(s, data)
    r = w.lang().receiver(A, src_rank=EMB)
    w.link().gate()
    assert r.init(CHUNK)
    w.deliver_all()
    w.link().wait_frames(1)
    return s, r, data


EMB_ABORT_RACE = (
    "engine bug: Sender.abort() while the room's last chunk is on the wire ends the "
    "Embedding room FAILED although that chunk completes: SendMachine.fail sets `failure` "
    "at once and SendMachine.frame_done counts SUCCESS only while `failure is None`. "
    "DESIGN.md 'Outcomes agree': an Embedding-side abort racing the last chunk ends "
    "SUCCESS on both sides if that chunk completes (the machine's own lane table says "
    "the same: SENT_LAST x room fails = 'in flight decides').")
REJECT_RACE = (
    " And the Language rank fails the room on that REJECT (sent_tokens=-1: 'any "
    "outstanding allocation will still be answered on the data stream') before its last "
    "chunk lands, so here both sides end FAILED for a chunk that completed.")


@pytest.mark.parametrize("world", RECV_INTO, indirect=True)
@pytest.mark.parametrize("reject_first", [
    pytest.param(False, id="chunk_first"),
    pytest.param(True, id="reject_first"),
])
def test_embedding_abort_racing_the_last_chunk_that_completes(world: World,
                                                             reject_first: bool) -> None:
    w = world
    s, r, data = last_chunk_in_flight(w)
    s.abort("inproc-test: abort racing the last chunk")
    if reject_first:  # the REJECT (if any) reaches the Language rank before the chunk
        w.deliver_all()
    w.link().deliver_frame()
    w.deliver_all()
    e_st, l_st = w.ended(s, "sender"), w.ended(r, "receiver")
    w.settle_whole()
    assert (e_st, l_st) == (SUCCESS, SUCCESS), (s.failure, r.failure)
    assert mismatches(r.result(), data) == []
    w.close()  # inside the test: a leak shows as this test's failure


@pytest.mark.parametrize("world", RECV_INTO, indirect=True)
def test_language_abort_racing_the_last_chunk_that_completes(world: World) -> None:
    w = world
    s, r, _ = last_chunk_in_flight(w)
    r.abort("inproc-test: abort racing the last chunk")
    w.deliver_all()  # the ABORT reaches the Embedding rank while the chunk is on the wire
    w.link().deliver_frame()
    e_st, l_st = w.ended(s, "sender"), w.ended(r, "receiver")
    w.settle_whole()
    assert l_st is FAILED and r.failure is not None and "aborted on language rank 1" in r.failure
    assert e_st is SUCCESS, f"every byte was delivered, yet the sender says {s.failure!r}"
    w.close()


@pytest.mark.parametrize("world", RECV_INTO, indirect=True)
def test_language_abort_after_the_last_chunk_landed_is_a_noop(world: World) -> None:
    """The only permitted difference, in its allowed form: here the abort comes
    after SUCCESS, so nothing changes on either side."""
    w = world
    s, r, data = last_chunk_in_flight(w)
    w.link().deliver_frame()
    assert w.ended(r, "receiver") is SUCCESS
    r.abort("too late")
    w.deliver_all()
    assert w.ended(s, "sender") is SUCCESS and r.poll() is SUCCESS
    assert mismatches(r.result(), data) == []
    assert w.causes(EMB) == w.causes(LANG) == {}
