"""Real-process integration tests: the Gloo layer.

Every test here runs real ranks as separate processes (`harness.spawn`) on Gloo
over 127.0.0.1: rank 0 is the Embedding rank, rank 1 the Language rank, and
every byte moves through the real ZeroMQ control plane and real
torch.distributed point-to-point sends. Nothing is mocked.

Starting two processes costs seconds, so the scenarios are grouped into
*suites*: one spawned run per suite (a config: receive mode, auto_resume, pool
sizes) runs all of that suite's scenarios one after the other, each with its
own room ids, and returns one outcome per scenario. A suite runs once, the
first time a test asks for it; each test function then checks the outcome of
its own scenario. A scenario that fails is reported as that scenario's failure
(with both ranks' tracebacks); the scenarios after it in the same suite report
that they did not run, because the context may be damaged.

Rules every scenario follows:
- comparisons are bit-exact (bf16 through `.view(torch.int16)`, ints with
  `torch.equal`), against tensors both ranks rebuild from the room id;
- every wait is a bounded loop that raises with the room's state on timeout;
  ordering between the ranks is forced with named handshakes in the c10d store
  (never with a sleep alone);
- after each scenario, both ranks check `pool_free_blocks == pool_total_blocks`
  and `rooms_live == 0` (the Embedding rank after its senders are SUCCESS;
  allowing the gauges a bounded 2 s to catch up, a lag that
  test_success_is_reported_after_blocks_are_returned checks strictly), and
  strictly again before `ctx.shutdown()`.

A few scenarios look inside through attributes the public objects expose:
`ctx.language.pool` (buffers scrambled, allocator calls recorded), the engines'
`stats` (gauge updates slowed down), and, to confirm an ALLOC really arrived
before `send()`, the Embedding engine's table of early ALLOCs when it has one.
"""

from __future__ import annotations

import collections
import datetime
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.distributed as dist
from harness import check_whole, rank_results, spawn
from roomdata import make_data, mismatches

import disagg
from disagg import TransferStatus

pytestmark = pytest.mark.timeout(120)

HIDDEN = 64
BS = 16
DEEPSTACK = {"deepstack": ((3, 8), "bfloat16")}
POLL_S = 0.0005  # yield the GIL to the library's threads between polls
CASE_TIMEOUT_S = 15.0  # per wait; below bootstrap_timeout so a stall is ours to report
SYNC_TIMEOUT_S = 20.0
SPAWN_TIMEOUT_S = 110.0

# Suites: (Embedding rank config, Language rank config); num_blocks may differ per rank.
_COMMON = dict(hidden_size=HIDDEN, block_size=BS, extra_buffers=DEEPSTACK,
               bootstrap_timeout=20.0, peer_timeout=5.0)
SUITE_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # roomy pools; first allocation 40 tokens -> 3 blocks = 48 tokens
    "std": ({**_COMMON, "default_alloc_tokens": 40, "num_blocks": 256},
            {**_COMMON, "default_alloc_tokens": 40, "num_blocks": 64}),
    # a Language pool of 8 blocks (128 tokens) and an Embedding budget of 40 blocks
    "small": ({**_COMMON, "default_alloc_tokens": 32, "num_blocks": 40},
              {**_COMMON, "default_alloc_tokens": 32, "num_blocks": 8}),
    # block_size 128 and no M-RoPE
    "wide": ({**_COMMON, "block_size": 128, "mrope": False, "num_blocks": 80},
             {**_COMMON, "block_size": 128, "mrope": False, "num_blocks": 72}),
}


# ---------------------------------------------------------------------------
# in-rank helpers (run inside the spawned processes)
# ---------------------------------------------------------------------------


def aux_of(room: int, seq: int) -> tuple[int, ...]:
    """Eight int64 values: negatives, both extremes, and room-specific ones."""
    return (room % 97 - 50, -(1 << 63), (1 << 63) - 1, -1, 0, seq, (1 << 40) + room,
            -(1 << 33) - seq)


def check_result(cfg: disagg.DisaggConfig, room: int, seq: int, aux: tuple[int, ...],
                 res: disagg.EmbeddingResult) -> None:
    bad = mismatches(res, make_data(cfg, room, seq), aux, room, seq)
    if bad:
        raise AssertionError(f"not bit-exact: {'; '.join(bad)}")


class Deadline:
    def __init__(self, seconds: float, what: str) -> None:
        self.at = time.monotonic() + seconds
        self.seconds = seconds
        self.what = what

    def check(self, detail: Callable[[], str] = lambda: "") -> None:
        if time.monotonic() > self.at:
            raise TimeoutError(f"{self.what}: not done within {self.seconds:g}s; {detail()}")


def describe(receivers: dict[int, Any]) -> str:
    return "; ".join(f"room {room}: {r.poll().name} progress={r.progress} "
                     f"needs_resume={r.needs_resume} failure={r.failure}"
                     for room, r in list(receivers.items())[:8])


def expected_chunks(seq: int, first_tokens: int, resume_tokens: int | None, bs: int,
                    pool_blocks: int) -> list[int]:
    """Chunk sizes the spec implies: every allocation is whole blocks (never
    more than the pool, nor than the rest once seq is known) and each chunk is
    min(remaining, allocated)."""
    chunks = []
    allocated = min(math.ceil(first_tokens / bs), pool_blocks) * bs
    while True:
        n = min(seq - sum(chunks), allocated)
        chunks.append(n)
        rest = seq - sum(chunks)
        if rest == 0:
            return chunks
        want = rest if resume_tokens is None else min(resume_tokens, rest)
        allocated = min(math.ceil(want / bs), pool_blocks) * bs


COUNTERS = ("chunks", "resumes", "failures", "bytes_sent", "bytes_received")


@dataclass
class Env:
    """What a scenario gets besides the context: who it is, named handshakes,
    unique room ids and counter deltas."""

    ctx: Any
    cfg: disagg.DisaggConfig
    suite: str
    recv_into: str
    auto_resume: bool
    case: str
    room_base: int
    store: Any
    before: dict[str, Any] = field(default_factory=dict)

    @property
    def embedding(self) -> bool:
        return self.ctx.role == "embedding"

    def room(self, i: int) -> int:
        return self.room_base + i

    def handshake(self, tag: str, timeout: float = SYNC_TIMEOUT_S) -> None:
        """Both ranks reach `tag` before either goes on (a named, bounded rendezvous)."""
        me, peer = self.ctx.rank, 1 - self.ctx.rank
        self.store.set(f"test/{self.case}/{tag}/{me}", b"1")
        self.store.wait([f"test/{self.case}/{tag}/{peer}"], datetime.timedelta(seconds=timeout))

    def delta(self) -> dict[str, int]:
        now = self.ctx.stats()
        return {k: int(now[k]) - int(self.before[k]) for k in COUNTERS}


def settle_whole(ctx: Any, when: str, timeout: float = 2.0) -> None:
    """`check_whole`, allowing the accounting a bounded moment to catch up with a
    status already reported (that lag itself is tested strictly in
    test_success_is_reported_after_blocks_are_returned)."""
    dl = Deadline(timeout, f"{ctx.role} pool whole {when}")
    while True:
        try:
            check_whole(ctx, when)
            return
        except AssertionError as e:
            dl.check(lambda e=e: str(e))
        time.sleep(POLL_S)


# -- Embedding side --------------------------------------------------------


def send_rooms(env: Env, specs: list[tuple[int, int, tuple[int, ...] | None]],
               timeout: float = CASE_TIMEOUT_S) -> dict[int, tuple[Any, dict[str, Any]]]:
    """Send every (room, seq, aux) in order, retrying on PoolFull; returns the
    senders with the tensors they must keep alive."""
    out: dict[int, tuple[Any, dict[str, Any]]] = {}
    dl = Deadline(timeout, "sending")
    for room, seq, aux in specs:
        data = make_data(env.cfg, room, seq)
        s = env.ctx.embedding.sender(room)
        while True:
            try:
                s.send(data["embeddings"], data["fill_ids"], data["mrope_positions"], aux=aux,
                       **data["extra"])
                break
            except disagg.PoolFull:
                dl.check(lambda room=room: f"room {room} still PoolFull")
                time.sleep(POLL_S)
        out[room] = (s, data)
    return out


def await_senders(senders: dict[int, tuple[Any, Any]], timeout: float = CASE_TIMEOUT_S) -> None:
    dl = Deadline(timeout, "embedding senders")
    while True:
        states = {room: s.poll() for room, (s, _) in senders.items()}
        failed = {room: senders[room][0].failure for room, st in states.items()
                  if st == TransferStatus.FAILED}
        if failed:
            raise AssertionError(f"senders failed: {failed}")
        if all(st == TransferStatus.SUCCESS for st in states.values()):
            return
        dl.check(lambda states=states: str({room: st.name for room, st in states.items()
                                            if st != TransferStatus.SUCCESS}))
        time.sleep(POLL_S)


def embedding_side(env: Env, specs: list[tuple[int, int, tuple[int, ...] | None]]) -> None:
    await_senders(send_rooms(env, specs))


# -- Language side ----------------------------------------------------------


def drive(receivers: dict[int, Any], *, resume_tokens: int | None = None,
          on_needs_resume: Callable[[int, Any], None] | None = None,
          timeout: float = CASE_TIMEOUT_S) -> dict[int, disagg.EmbeddingResult]:
    """Poll every (already initialised) receiver to SUCCESS, calling resume()
    whenever a room needs it; any FAILED room raises."""
    results: dict[int, disagg.EmbeddingResult] = {}
    dl = Deadline(timeout, "receiving")
    while len(results) < len(receivers):
        for room, r in receivers.items():
            if room in results:
                continue
            st = r.poll()
            if st == TransferStatus.FAILED:
                raise AssertionError(f"room {room} failed: {r.failure}")
            if st == TransferStatus.SUCCESS:
                results[room] = r.result()
            elif r.needs_resume:
                if on_needs_resume is not None:
                    on_needs_resume(room, r)
                r.resume(resume_tokens)  # False: no blocks yet, retried next pass
        dl.check(lambda: describe({k: v for k, v in receivers.items() if k not in results}))
        time.sleep(POLL_S)
    return results


def init_all(env: Env, rooms: list[int], num_tokens: int | None = None) -> dict[int, Any]:
    receivers = {}
    for room in rooms:
        r = env.ctx.language.receiver(room, src_rank=0)
        if not r.init(num_tokens):
            raise AssertionError(f"room {room}: init({num_tokens}) found no blocks in an "
                                 f"idle pool: {env.ctx.stats()}")
        receivers[room] = r
    return receivers


def receive(env: Env, specs: list[tuple[int, int, tuple[int, ...] | None]], *,
            init_tokens: int | None = None, resume_tokens: int | None = None,
            on_needs_resume: Callable[[int, Any], None] | None = None) -> None:
    receivers = init_all(env, [room for room, _, _ in specs], init_tokens)
    results = drive(receivers, resume_tokens=resume_tokens, on_needs_resume=on_needs_resume)
    for room, seq, aux in specs:
        check_result(env.cfg, room, seq, aux or (), results[room])


def first_alloc(env: Env) -> int:
    d = env.cfg.default_alloc_tokens
    assert isinstance(d, int)
    return d


# ---------------------------------------------------------------------------
# scenarios: each runs on both ranks and returns a small picklable summary
# ---------------------------------------------------------------------------


def sc_resume_triggers_next_chunk(env: Env) -> dict[str, Any]:
    """Rooms that need one and two RESUMEs (the second capped at the whole pool),
    one room at a time: each must reach SUCCESS well before any library timeout."""
    lang_blocks = SUITE_CONFIGS[env.suite][1]["num_blocks"]
    seqs = [49, 300, 48 + lang_blocks * BS + 28]
    expected = [expected_chunks(s, first_alloc(env), None, BS, lang_blocks) for s in seqs]
    for i, seq in enumerate(seqs):
        spec = [(env.room(i), seq, aux_of(env.room(i), seq))]
        if env.embedding:
            embedding_side(env, spec)
        else:
            receive(env, spec)
    return {"delta": env.delta(), "chunks": sum(len(c) for c in expected),
            "resumes": sum(len(c) - 1 for c in expected)}


def sc_allocated_tokens_block_aligned(env: Env) -> dict[str, Any]:
    """init(num_tokens=8000) with block_size 128 takes 63 blocks = 8064 tokens, and
    the first chunk is 8064 tokens, not 8000 (manual mode, so progress holds still)."""
    out: dict[str, Any] = {"progress": [], "used_after_init": []}
    for i, seq in enumerate([9000, 8064, 8065]):
        room = env.room(i)
        spec = [(room, seq, aux_of(room, seq))]
        if env.embedding:
            env.handshake(f"alloc{i}")  # ALLOC first: the used-block count cannot move yet
            embedding_side(env, spec)
            continue
        r = env.ctx.language.receiver(room, src_rank=0)
        assert r.init(num_tokens=8000)
        st = env.ctx.stats()
        out["used_after_init"].append(st["pool_total_blocks"] - st["pool_free_blocks"])
        env.handshake(f"alloc{i}")
        first: list[tuple[int, int | None]] = []
        results = drive({room: r},
                        on_needs_resume=lambda _room, rr, first=first: first.append(rr.progress))
        out["progress"].append(first[0] if first else None)
        check_result(env.cfg, room, seq, aux_of(room, seq), results[room])
    out["delta"] = env.delta()
    return out


def _garbage(pool: Any) -> None:
    for buf in pool.buffers.values():
        flat = buf.view(-1).view(torch.uint8)
        flat.copy_(torch.randint(0, 256, flat.shape, dtype=torch.uint8))


def sc_resume_chunks_do_not_read_seq_len_or_aux_from_blocks(env: Env) -> dict[str, Any]:
    """Pool mode, manual resume: after every chunk lands the whole Language pool
    is overwritten with random bytes; seq_len, aux and data must still be exact,
    and a finished result must not alias the pool. One room at a time, so no
    other room's chunk is landing while the pool is scrambled."""
    specs = [(env.room(0), 16 * 6 + 5, aux_of(env.room(0), 101)),
             (env.room(1), 300, aux_of(env.room(1), 300))]
    if env.embedding:
        for spec in specs:
            embedding_side(env, [spec])
        return {"delta": env.delta()}
    pool = env.ctx.language.pool
    assert pool.buffers, "pool mode must have landing buffers"
    seen: dict[int, list[tuple[int, int | None]]] = collections.defaultdict(list)

    def scramble(room: int, r: Any) -> None:
        if not seen[room] or seen[room][-1] != r.progress:  # once per landed chunk
            seen[room].append(r.progress)
            _garbage(pool)

    for room, seq, aux in specs:
        _garbage(pool)
        receivers = init_all(env, [room], num_tokens=BS)
        results = drive(receivers, resume_tokens=2 * BS, on_needs_resume=scramble)
        _garbage(pool)  # after SUCCESS too: the result is the room's own tensors
        check_result(env.cfg, room, seq, aux, results[room])
        bad = [p for p in seen[room] if p[1] != seq]
        assert not bad, f"room {room}: progress reported seq_len {bad}, expected {seq}"
    return {"delta": env.delta(), "rounds": {room: len(v) for room, v in seen.items()}}


def sc_repeated_polling_during_resume_is_idempotent(env: Env) -> dict[str, Any]:
    """Manual mode: resume() called over and over, with poll()/needs_resume/progress,
    in a tight loop; every round must resume exactly once."""
    a, b = env.room(0), env.room(1)
    seq_a, seq_b = 16 * 7 + 3, 100
    specs = [(a, seq_a, aux_of(a, seq_a)), (b, seq_b, aux_of(b, seq_b))]
    exp_a = expected_chunks(seq_a, BS, BS, BS, 64)  # resume(num_tokens=16) every round
    exp_b = expected_chunks(seq_b, BS, None, BS, 64)  # resume() for the rest
    out = {"chunks": len(exp_a) + len(exp_b), "resumes": len(exp_a) + len(exp_b) - 2}
    if env.embedding:
        embedding_side(env, specs)
        return {**out, "delta": env.delta()}
    receivers = init_all(env, [a, b], num_tokens=BS)
    want = {a: BS, b: None}
    dl = Deadline(CASE_TIMEOUT_S, "repeated polling")
    calls = 0
    while not all(r.poll() == TransferStatus.SUCCESS for r in receivers.values()):
        for room, r in receivers.items():
            for _ in range(5):
                r.poll()
                _ = r.needs_resume, r.progress
                ok = r.resume(want[room])
                calls += 1
                assert ok, f"room {room}: resume() returned False with a roomy pool"
            assert r.poll() != TransferStatus.FAILED, r.failure
        dl.check(lambda: describe(receivers))
    for room, seq, aux in specs:
        check_result(env.cfg, room, seq, aux, receivers[room].result())
    return {**out, "delta": env.delta(), "calls": calls}


def sc_allocator_returns_identical_block_ids(env: Env) -> dict[str, Any]:
    """The Language pool holds exactly one allocation, so every RESUME gets the very
    same block ids as the allocation before it; resume keyed by block ids would stall."""
    room, seq = env.room(0), 600
    spec = [(room, seq, aux_of(room, seq))]
    pool_blocks = SUITE_CONFIGS["small"][1]["num_blocks"]
    exp = expected_chunks(seq, pool_blocks * BS, None, BS, pool_blocks)
    if env.embedding:
        embedding_side(env, spec)
        return {"delta": env.delta(), "chunks": len(exp)}
    alloc = env.ctx.language.pool.allocator
    record: list[list[int]] = []
    real_allocate = alloc.allocate

    def recording_allocate(num_blocks: int, owner: int) -> list[int]:
        ids = real_allocate(num_blocks, owner)  # PoolFull propagates, nothing recorded
        record.append(list(ids))
        return ids

    snapshots: list[tuple[str, list[int]]] = []
    alloc.allocate = recording_allocate
    try:
        r = env.ctx.language.receiver(room, src_rank=0)
        assert r.init(num_tokens=pool_blocks * BS)
        snapshots.append(("after init", alloc.owned_by(room)))

        def on_partial(_room: int, rr: Any) -> None:
            snapshots.append(("partial", alloc.owned_by(room)))
            if rr.resume():
                snapshots.append(("after resume", alloc.owned_by(room)))

        results = drive({room: r}, on_needs_resume=on_partial)
    finally:
        del alloc.allocate
    check_result(env.cfg, room, seq, aux_of(room, seq), results[room])
    return {"delta": env.delta(), "chunks": len(exp), "record": record,
            "snapshots": snapshots, "expected": exp, "owned_after": alloc.owned_by(room)}


def sc_pool_double_buffers_resume(env: Env) -> dict[str, Any]:
    """Pool mode, auto_resume, a room of 300 tokens that first takes half of an
    8-block pool: the RESUME for each next chunk goes out when the current chunk's
    meta arrives, into the other half, so every allocation is 4 blocks (the last
    3) and the loop never sees needs_resume. Only the first chunk lands in the
    pool: the later ones go straight into the output, their blocks being credit."""
    room, seq = env.room(0), 300
    spec = [(room, seq, aux_of(room, seq))]
    if env.embedding:
        embedding_side(env, spec)
        return {"delta": env.delta()}
    alloc = env.ctx.language.pool.allocator
    sizes: list[int] = []
    real_allocate = alloc.allocate

    def recording_allocate(num_blocks: int, owner: int) -> list[int]:
        ids = real_allocate(num_blocks, owner)
        sizes.append(len(ids))
        return ids

    from disagg.language import stream
    copied: list[int] = []  # token offsets of the chunks copied out of the pool
    real_copy_out = stream.copy_out

    def recording_copy_out(geometry: Any, pool: Any, outputs: Any, plan: Any, offset: int,
                           device: Any) -> None:
        copied.append(offset)
        real_copy_out(geometry, pool, outputs, plan, offset, device)

    partial_seen: list[int] = []
    alloc.allocate = recording_allocate
    stream.copy_out = recording_copy_out
    try:
        receive(env, spec, init_tokens=4 * BS,
                on_needs_resume=lambda _room, r: partial_seen.append(r.progress[0]))
    finally:
        del alloc.allocate
        stream.copy_out = real_copy_out
    return {"delta": env.delta(), "sizes": sizes, "partial_seen": partial_seen,
            "copied": copied}


def sc_ops_per_chunk(env: Env) -> dict[str, Any]:
    """One room in one contiguous chunk: how many payload recvs the Language rank
    posts for it (one per wire buffer: fill_ids and M-RoPE positions travel packed)."""
    room, seq = env.room(0), 100
    spec = [(room, seq, aux_of(room, seq))]
    if env.embedding:
        embedding_side(env, spec)
        return {"delta": env.delta()}
    transport = env.ctx.language.engine._transports[0]
    posted: list[int] = []  # payload recvs per post, pre-posted (with the meta) or not

    def record(name: str) -> None:
        real = getattr(transport, name)

        def recording(dsts: list[Any]) -> Any:
            posted.append(len(dsts))
            return real(dsts)
        setattr(transport, name, recording)

    record("post_recv")
    record("post_frame_recv")
    try:
        receive(env, spec, init_tokens=seq)
    finally:
        del transport.post_recv, transport.post_frame_recv
    return {"delta": env.delta(), "posted": posted,
            "wire_buffers": [b.name for b in env.ctx.language.engine.geometry.wire_buffers]}


def sc_posts_outside_engine_lock(env: Env) -> dict[str, Any]:
    """Rooms of one and of several chunks, all in flight: every post on the pair
    (Embedding: frames; Language: meta and payload recvs) is made without the
    engine lock, since a Gloo post can wait for the pair's busy socket."""
    specs = [(env.room(i), seq, aux_of(env.room(i), seq))
             for i, seq in enumerate([30, 100, 260, 7, 190])]
    if env.embedding:
        engine = env.ctx.embedding  # the engine itself
        names = ["post_frame"]
    else:
        engine = env.ctx.language.engine
        names = ["post_recv", "post_meta_recv", "post_frame_recv"]
    transport = next(iter(engine._transports.values()))
    under_lock: list[str] = []
    calls = [0]

    def watch(name: str) -> Callable[..., Any]:
        real = getattr(transport, name)

        def watched(*args: Any, **kw: Any) -> Any:
            calls[0] += 1
            if engine.holds_lock():
                under_lock.append(name)
            return real(*args, **kw)
        return watched

    for name in names:
        setattr(transport, name, watch(name))
    try:
        if env.embedding:
            embedding_side(env, specs)
        else:
            receive(env, specs)
    finally:
        for name in names:
            delattr(transport, name)
    return {"delta": env.delta(), "under_lock": under_lock, "calls": calls[0]}


def sc_many_rounds_one_room(env: Env) -> dict[str, Any]:
    """One room moved one block per round: init(16) then 55 x resume(num_tokens=16)."""
    room, seq = env.room(0), 16 * 55 + 7
    spec = [(room, seq, aux_of(room, seq))]
    exp = expected_chunks(seq, BS, BS, BS, 64)
    if env.embedding:
        embedding_side(env, spec)
    else:
        receive(env, spec, init_tokens=BS, resume_tokens=BS)
    return {"delta": env.delta(), "chunks": len(exp)}


def sc_lengths_edge_cases(env: Env) -> dict[str, Any]:
    """Lengths around the block size and around default_alloc_tokens (40, i.e. 48
    allocated), and one longer than the whole Language pool, all rooms at once."""
    d = first_alloc(env)
    first = math.ceil(d / BS) * BS
    seqs = sorted({1, BS - 1, BS, BS + 1, d, d + 1, first - 1, first, first + 1, 2100})
    specs = [(env.room(i), s, aux_of(env.room(i), s)) for i, s in enumerate(seqs)]
    lang_blocks = SUITE_CONFIGS[env.suite][1]["num_blocks"]
    exp = {room: expected_chunks(s, d, None, BS, lang_blocks) for room, s, _ in specs}
    out: dict[str, Any] = {"chunks": sum(len(c) for c in exp.values()),
                           "resumes": sum(len(c) - 1 for c in exp.values())}
    if env.embedding:
        embedding_side(env, specs)
        return {**out, "delta": env.delta()}
    first_progress: dict[int, tuple[int, int | None]] = {}
    receive(env, specs, on_needs_resume=lambda room, r: first_progress.setdefault(
        room, r.progress))
    out["first_progress"] = {room: first_progress.get(room) for room, _, _ in specs}
    out["expected_first"] = {room: ((c[0], sum(c)) if len(c) > 1 else None)
                             for room, c in exp.items()}
    return {**out, "delta": env.delta()}


N_CONCURRENT = 64
N_TINY_ROOMS = 20


def _concurrent_specs(env: Env) -> list[tuple[int, int, tuple[int, ...]]]:
    g = torch.Generator().manual_seed(1234)
    seqs = torch.randint(1, 151, (N_CONCURRENT,), generator=g).tolist()
    return [(env.room(i), s, aux_of(env.room(i), s)) for i, s in enumerate(seqs)]


def _embedding_stream(env: Env, specs: list[tuple[int, int, tuple[int, ...]]]) -> dict[str, int]:
    """Send rooms strictly in order as the (small) budget allows; PoolFull means
    retry later. Keep each room's tensors until its sender is SUCCESS."""
    todo = collections.deque(specs)
    live: dict[int, tuple[Any, dict[str, Any]]] = {}
    pending: tuple[int, Any, dict[str, Any], tuple[int, ...]] | None = None
    pool_full = 0
    dl = Deadline(3 * CASE_TIMEOUT_S, "embedding stream")
    while todo or live or pending:
        while todo or pending:
            if pending is None:
                room, seq, aux = todo.popleft()
                pending = (room, env.ctx.embedding.sender(room), make_data(env.cfg, room, seq),
                           aux)
            room, s, data, aux = pending
            try:
                s.send(data["embeddings"], data["fill_ids"], data["mrope_positions"], aux=aux,
                       **data["extra"])
            except disagg.PoolFull:
                pool_full += 1
                break
            live[room] = (s, data)
            pending = None
        for room, (s, _) in list(live.items()):
            st = s.poll()
            if st == TransferStatus.FAILED:
                raise AssertionError(f"sender {room} failed: {s.failure}")
            if st == TransferStatus.SUCCESS:
                del live[room]
        dl.check(lambda: f"{len(todo)} unsent, live {sorted(live)[:8]}, "
                         f"stats {env.ctx.stats()}")
        time.sleep(POLL_S)
    return {"pool_full": pool_full}


def sc_concurrent_rooms_raw(env: Env) -> dict[str, Any]:
    """64 rooms of random lengths through an 8-block Language pool with the raw
    Receiver API: rooms start in order, init()/resume() that return False are
    retried, resumes go before new rooms (falling back to one block), and in pool
    mode at most 3 rooms wait for a first chunk, so rooms that have data can
    always get a block (with direct output, resumes need no blocks at all)."""
    specs = _concurrent_specs(env)
    if env.embedding:
        return {**_embedding_stream(env, specs), "delta": env.delta()}
    by_room = {room: (seq, aux) for room, seq, aux in specs}
    todo = collections.deque(room for room, _, _ in specs)
    active: dict[int, Any] = {}  # started (init returned True), not finished
    waiting_limit = 3 if env.recv_into == "pool" else N_CONCURRENT
    done: set[int] = set()
    counts = collections.Counter()
    dl = Deadline(3 * CASE_TIMEOUT_S, "concurrent rooms (raw)")
    unstarted: Any = None
    while todo or active or unstarted is not None:
        for r in list(active.values()):  # resumes first, in room order
            if r.needs_resume and not r.resume():
                counts["resume_false"] += 1
                if not r.resume(num_tokens=BS):
                    counts["resume_false_small"] += 1
        for room, r in list(active.items()):
            st = r.poll()
            if st == TransferStatus.FAILED:
                raise AssertionError(f"room {room} failed: {r.failure}")
            if st == TransferStatus.SUCCESS:
                seq, aux = by_room[room]
                check_result(env.cfg, room, seq, aux, r.result())
                done.add(room)
                del active[room]
        while todo or unstarted is not None:  # start rooms strictly in order
            waiting = sum(r.poll() == TransferStatus.WAITING_FOR_INPUT for r in active.values())
            if waiting >= waiting_limit:
                break
            if unstarted is None:
                room = todo.popleft()
                unstarted = (room, env.ctx.language.receiver(room, src_rank=0))
            room, r = unstarted
            if not r.init():
                counts["init_false"] += 1
                break
            active[room] = r
            unstarted = None
        dl.check(lambda: f"{len(todo)} not started, {len(done)} done; "
                         f"{describe(active)}; stats {env.ctx.stats()}")
        time.sleep(POLL_S)
    assert done == set(by_room), f"missing rooms {sorted(set(by_room) - done)}"
    return {"delta": env.delta(), **counts}


def sc_concurrent_rooms_queue(env: Env) -> dict[str, Any]:
    """The same 64 rooms through ctx.language.queue(): add them all, step until
    every room is done; done is checked as a set and every result bit-exact."""
    specs = _concurrent_specs(env)
    if env.embedding:
        return {**_embedding_stream(env, specs), "delta": env.delta()}
    by_room = {room: (seq, aux) for room, seq, aux in specs}
    q = env.ctx.language.queue()
    for room, _, _ in specs:
        q.add(room, src_rank=0)
    got: list[int] = []
    steps = 0
    dl = Deadline(3 * CASE_TIMEOUT_S, "concurrent rooms (queue)")
    while len(got) < len(specs):
        done, failed = q.step()
        steps += 1
        assert not failed, f"queue failed rooms: {failed[:4]}"
        for room, res in done:
            seq, aux = by_room[room]
            check_result(env.cfg, room, seq, aux, res)
            got.append(room)
        dl.check(lambda: f"{len(got)} done, {len(q)} queued; stats {env.ctx.stats()}")
        time.sleep(POLL_S)
    assert len(got) == len(set(got)), "a room was returned twice"
    assert set(got) == set(by_room)
    assert len(q) == 0
    return {"delta": env.delta(), "steps": steps}


def sc_alloc_before_data(env: Env) -> dict[str, Any]:
    """Every ALLOC has reached the Embedding rank before send() is called."""
    specs = [(env.room(i), s, aux_of(env.room(i), s)) for i, s in enumerate([1, 48, 49, 300])]
    rooms = [room for room, _, _ in specs]
    if env.embedding:
        env.handshake("allocs_posted")
        lobby = env.ctx.embedding.lobby
        dl = Deadline(CASE_TIMEOUT_S, "ALLOCs arriving")
        # White-box: the lobby's table of ALLOCs that wait for data (the handshake
        # orders init() before send(), not the ALLOC's arrival). It used to look
        # for an engine attribute that had moved, so it never waited: now and
        # then a room's status was read before its ALLOC came.
        while not all(lobby.holds(room) for room in rooms):
            dl.check(lambda: f"early ALLOCs {[r for r in rooms if lobby.holds(r)]}")
            time.sleep(POLL_S)
        senders = send_rooms(env, specs)
        after = {room: s.poll().name for room, (s, _) in senders.items()}
        await_senders(senders)
        return {"delta": env.delta(), "status_after_send": after}
    receivers = init_all(env, rooms)
    statuses = {room: r.poll().name for room, r in receivers.items()}
    env.handshake("allocs_posted")
    results = drive(receivers)
    for room, seq, aux in specs:
        check_result(env.cfg, room, seq, aux, results[room])
    return {"delta": env.delta(), "status_after_init": statuses}


def sc_data_before_alloc(env: Env) -> dict[str, Any]:
    """send() has returned for every room before the Language rank makes its
    receivers and sends ALLOC."""
    specs = [(env.room(i), s, aux_of(env.room(i), s)) for i, s in enumerate([1, 48, 49, 300])]
    if env.embedding:
        senders = send_rooms(env, specs)
        after = {room: s.poll().name for room, (s, _) in senders.items()}
        env.handshake("data_sent")
        await_senders(senders)
        return {"delta": env.delta(), "status_after_send": after}
    env.handshake("data_sent")
    receive(env, specs)
    return {"delta": env.delta()}


def sc_aux_and_extra_buffers(env: Env) -> dict[str, Any]:
    """aux of 8 int64s (negatives, both extremes), no aux, one aux; the extra
    `deepstack` buffer; multi-chunk rooms so aux must survive resumes."""
    r = env.room
    specs = [(r(0), 1, aux_of(r(0), 1)), (r(1), 33, None), (r(2), 100, (-7,)),
             (r(3), 5 * env.cfg.block_size + 3, aux_of(r(3), 5 * env.cfg.block_size + 3))]
    if env.embedding:
        embedding_side(env, specs)
        return {"delta": env.delta()}
    receivers = init_all(env, [room for room, _, _ in specs], num_tokens=2 * env.cfg.block_size)
    results = drive(receivers)
    shapes = {}
    for room, seq, aux in specs:
        check_result(env.cfg, room, seq, aux or (), results[room])
        res = results[room]
        shapes[room] = {"mrope": None if res.mrope_positions is None
                        else tuple(res.mrope_positions.shape),
                        "deepstack": tuple(res.extra["deepstack"].shape),
                        "aux": tuple(res.aux)}
    return {"delta": env.delta(), "shapes": shapes, "specs": specs}


def sc_queue_single_rank_instance(env: Env) -> dict[str, Any]:
    """A one-rank instance's queue: step() returns (room, EmbeddingResult) pairs."""
    specs = [(env.room(i), s, aux_of(env.room(i), s)) for i, s in enumerate([5, 60, 200])]
    if env.embedding:
        embedding_side(env, specs)
        return {}
    q = env.ctx.language.queue()
    for room, _, _ in specs:
        q.add(room, src_rank=0)
    items: list[Any] = []
    dl = Deadline(CASE_TIMEOUT_S, "queue")
    while len(items) < len(specs):
        done, failed = q.step()
        assert isinstance(done, list) and isinstance(failed, list)
        assert failed == [], failed
        items.extend(done)
        dl.check(lambda: f"{len(items)} done")
        time.sleep(POLL_S)
    kinds = []
    by_room = {room: (seq, aux) for room, seq, aux in specs}
    for item in items:
        kinds.append((type(item).__name__, len(item), type(item[0]).__name__,
                      type(item[1]).__name__))
        room, res = item
        check_result(env.cfg, room, *by_room[room], res)
    return {"kinds": kinds, "rooms": sorted(room for room, _ in items),
            "expected_rooms": sorted(by_room), "after": q.step()}


def sc_success_is_reported_after_blocks_are_returned(env: Env) -> dict[str, Any]:
    """Tiny rooms one after the other; the moment a rank sees SUCCESS, its stats
    must already show the room's blocks returned and the room gone (else a caller
    that sends the next room right away gets a spurious PoolFull, or cannot reuse
    the room id). Every gauge update is slowed down by a few milliseconds, so any
    bookkeeping done *after* the status is published is seen, deterministically;
    bookkeeping done before it only costs time."""
    engine = env.ctx.embedding if env.embedding else env.ctx.language.engine
    stats = engine.stats
    real_set_gauge = stats.set_gauge

    def slow_set_gauge(name: str, value: int) -> None:
        time.sleep(0.003)
        real_set_gauge(name, value)

    lags: list[tuple[int, int, int, int]] = []
    stats.set_gauge = slow_set_gauge
    try:
        for i in range(N_TINY_ROOMS):
            room, seq = env.room(i), 1 + i % 3
            if env.embedding:
                s, _data = send_rooms(env, [(room, seq, None)])[room]
            else:
                s = env.ctx.language.receiver(room, src_rank=0)
                assert s.init()
            dl = Deadline(CASE_TIMEOUT_S, f"tiny room {room}")
            while (st := s.poll()) not in (TransferStatus.SUCCESS, TransferStatus.FAILED):
                dl.check(lambda st=st: st.name)
            assert st == TransferStatus.SUCCESS, s.failure
            now = env.ctx.stats()
            if now["pool_free_blocks"] != now["pool_total_blocks"] or now["rooms_live"]:
                lags.append((i, now["pool_free_blocks"], now["pool_total_blocks"],
                             now["rooms_live"]))
            if not env.embedding:
                check_result(env.cfg, room, seq, (), s.result())
            env.handshake(f"room{i}")  # the next room starts on both ranks together
    finally:
        del stats.set_gauge
    return {"lags": lags}


# Which suites run which scenario. Suite key: (config, recv_into, auto_resume).
BOTH = ("output", "pool")
SCENARIOS: dict[str, tuple[Callable[[Env], dict[str, Any]], Callable[[str, str, bool], bool]]] = {
    "allocator_returns_identical_block_ids": (
        sc_allocator_returns_identical_block_ids, lambda c, m, a: c == "small" and m == "pool"),
    "concurrent_rooms_raw": (sc_concurrent_rooms_raw, lambda c, m, a: c == "small"),
    "concurrent_rooms_queue": (sc_concurrent_rooms_queue, lambda c, m, a: c == "small"),
    "allocated_tokens_block_aligned": (sc_allocated_tokens_block_aligned,
                                       lambda c, m, a: c == "wide"),
    "resume_triggers_next_chunk": (sc_resume_triggers_next_chunk, lambda c, m, a: c == "std"),
    "resume_chunks_do_not_read_seq_len_or_aux_from_blocks": (
        sc_resume_chunks_do_not_read_seq_len_or_aux_from_blocks,
        lambda c, m, a: c == "std" and m == "pool" and not a),
    "repeated_polling_during_resume_is_idempotent": (
        sc_repeated_polling_during_resume_is_idempotent, lambda c, m, a: c == "std" and not a),
    "pool_double_buffers_resume": (sc_pool_double_buffers_resume,
                                   lambda c, m, a: c == "small" and m == "pool" and a),
    "ops_per_chunk": (sc_ops_per_chunk, lambda c, m, a: c == "std" and a),
    "posts_outside_engine_lock": (sc_posts_outside_engine_lock,
                                  lambda c, m, a: c == "std"),
    "many_rounds_one_room": (sc_many_rounds_one_room, lambda c, m, a: c == "std" and not a),
    "lengths_edge_cases": (sc_lengths_edge_cases, lambda c, m, a: c == "std"),
    "alloc_before_data": (sc_alloc_before_data, lambda c, m, a: c == "std"),
    "data_before_alloc": (sc_data_before_alloc, lambda c, m, a: c == "std"),
    "aux_and_extra_buffers": (sc_aux_and_extra_buffers,
                              lambda c, m, a: (c == "std" and a) or c == "wide"),
    "queue_single_rank_instance": (sc_queue_single_rank_instance,
                                   lambda c, m, a: c == "std" and a),
    "success_is_reported_after_blocks_are_returned": (
        sc_success_is_reported_after_blocks_are_returned,
        lambda c, m, a: c == "std" and m == "output" and a),
}


def suite_scenarios(key: tuple[str, str, bool]) -> list[str]:
    return [name for name, (_, wanted) in SCENARIOS.items() if wanted(*key)]


def run_suite(rank: int, world: int, init_method: str, key: tuple[str, str, bool]) -> dict:
    """Spawned on both ranks: run the suite's scenarios in order."""
    conf, recv_into, auto_resume = key
    emb_kw, lang_kw = SUITE_CONFIGS[conf]
    kw = emb_kw if rank == 0 else lang_kw
    cfg = disagg.DisaggConfig(**kw, recv_into=recv_into, auto_resume=auto_resume)
    ctx = disagg.init(cfg, rank=rank, world_size=world, init_method=init_method)
    outcomes: dict[str, tuple[str, Any]] = {}
    try:
        assert ctx.role == ("embedding" if rank == 0 else "language")
        store = dist.distributed_c10d._get_default_store()
        broken = None
        for i, name in enumerate(suite_scenarios(key)):
            if broken is not None:
                outcomes[name] = ("skipped", f"not run: scenario {broken!r} failed earlier in "
                                             f"suite {key}")
                continue
            env = Env(ctx, cfg, conf, recv_into, auto_resume, name, (i + 1) << 20, store,
                      ctx.stats())
            try:
                out = SCENARIOS[name][0](env)
                settle_whole(ctx, f"after scenario {name}")
                outcomes[name] = ("ok", out)
            except Exception:
                outcomes[name] = ("error", traceback.format_exc())
            # Named rendezvous that also tells each rank how the other fared: after
            # a failure on either rank, both stop (the context may be damaged).
            mine = outcomes[name][0]
            env.store.set(f"test/{name}/outcome/{rank}", mine.encode())
            env.handshake("end")
            theirs = env.store.get(f"test/{name}/outcome/{1 - rank}").decode()
            if "error" in (mine, theirs):
                broken = name
        Env(ctx, cfg, conf, recv_into, auto_resume, "__final__", 0, store).handshake("end")
        try:
            outcomes["__final__"] = ("ok", check_whole(ctx, "before shutdown"))
        except AssertionError as e:
            outcomes["__final__"] = ("error", str(e))
    finally:
        ctx.shutdown()
    return outcomes


# ---------------------------------------------------------------------------
# test side
# ---------------------------------------------------------------------------

_SUITES: dict[tuple[str, str, bool], tuple[str, Any]] = {}


def outcome(key: tuple[str, str, bool], name: str) -> tuple[Any, Any]:
    """(Embedding rank's summary, Language rank's summary) of one scenario; runs
    the suite on first use."""
    assert name in suite_scenarios(key), f"{name} is not part of suite {key}"
    if key not in _SUITES:
        try:
            _SUITES[key] = ("ok", spawn(2, run_suite, key, timeout=SPAWN_TIMEOUT_S))
        except Exception as e:  # every test of the suite reports it
            _SUITES[key] = ("error", e)
    kind, value = _SUITES[key]
    if kind == "error":
        raise AssertionError(f"suite {key} did not complete: {value}")
    emb, lang = rank_results([value[r][name] for r in (0, 1)], f"scenario {name} in suite {key}",
                             ("embedding rank", "language rank"))
    if all(value[r][n][0] == "ok" for r in (0, 1) for n in value[r]
           if n != "__final__"):  # (else a failed scenario's own test reports it)
        for r in (0, 1):  # the whole run ended with both pools whole
            assert value[r]["__final__"][0] == "ok", value[r]["__final__"][1]
    return emb, lang


def assert_counts(emb: dict, lang: dict, chunks: int, resumes: int | None = None) -> None:
    """Both ranks counted the same chunks and resumes as the spec implies, and no failure."""
    assert emb["delta"]["chunks"] == lang["delta"]["chunks"] == chunks, (emb, lang)
    if resumes is not None:
        assert emb["delta"]["resumes"] == lang["delta"]["resumes"] == resumes, (emb, lang)
    assert emb["delta"]["failures"] == lang["delta"]["failures"] == 0, (emb, lang)
    assert emb["delta"]["bytes_sent"] == lang["delta"]["bytes_received"] > 0


@pytest.mark.parametrize("auto_resume", [True, False], ids=["auto", "manual"])
@pytest.mark.parametrize("recv_into", BOTH)
def test_resume_triggers_next_chunk(recv_into: str, auto_resume: bool) -> None:
    emb, lang = outcome(("std", recv_into, auto_resume), "resume_triggers_next_chunk")
    assert_counts(emb, lang, lang["chunks"], lang["resumes"])


@pytest.mark.parametrize("recv_into", BOTH)
def test_allocated_tokens_block_aligned(recv_into: str) -> None:
    emb, lang = outcome(("wide", recv_into, False), "allocated_tokens_block_aligned")
    assert lang["used_after_init"] == [63, 63, 63]  # 8000 tokens -> 63 blocks of 128
    assert lang["progress"] == [(8064, 9000), None, (8064, 8065)]
    assert_counts(emb, lang, chunks=2 + 1 + 2, resumes=2)


def test_resume_chunks_do_not_read_seq_len_or_aux_from_blocks() -> None:
    emb, lang = outcome(("std", "pool", False),
                        "resume_chunks_do_not_read_seq_len_or_aux_from_blocks")
    # 101 tokens: 16 then 32 per round -> 4 chunks; 300 tokens -> 1 + 9 = 10 chunks
    assert_counts(emb, lang, chunks=4 + 10, resumes=3 + 9)
    assert sorted(lang["rounds"].values()) == [3, 9]  # the pool was scrambled every round


@pytest.mark.parametrize("recv_into", BOTH)
def test_repeated_polling_during_resume_is_idempotent(recv_into: str) -> None:
    emb, lang = outcome(("std", recv_into, False), "repeated_polling_during_resume_is_idempotent")
    assert lang["calls"] > 3 * lang["resumes"]  # the loop really did repeat itself
    assert_counts(emb, lang, lang["chunks"], lang["resumes"])


@pytest.mark.parametrize("auto_resume", [True, False], ids=["auto", "manual"])
def test_allocator_returns_identical_block_ids(auto_resume: bool) -> None:
    emb, lang = outcome(("small", "pool", auto_resume), "allocator_returns_identical_block_ids")
    whole = list(range(8))
    # 600 tokens through 8 blocks of 16: 4 allocations of the same 8 ids, then 6 of them
    assert lang["expected"] == [128, 128, 128, 128, 88]
    assert lang["record"] == [whole] * 4 + [whole[:6]], lang["record"]
    snaps = lang["snapshots"]
    assert snaps[0] == ("after init", whole)
    for what, ids in snaps[1:]:
        if what == "partial":  # a landed chunk has given back every block
            assert ids == [], snaps
        else:  # right after resume(): the same ids again, or already landed and freed
            assert ids in (whole, whole[:6], []), snaps
    if not auto_resume:
        assert [w for w, _ in snaps].count("after resume") == 4, snaps
    assert lang["owned_after"] == []
    assert_counts(emb, lang, chunks=5, resumes=4)


def test_pool_double_buffers_resume() -> None:
    emb, lang = outcome(("small", "pool", True), "pool_double_buffers_resume")
    # waiting for the landing blocks instead would give 4, then 8, then 7 blocks
    assert lang["sizes"] == [4, 4, 4, 4, 3], lang["sizes"]
    assert lang["partial_seen"] == []
    assert lang["copied"] == [0], lang["copied"]  # resume chunks: straight into the output
    assert_counts(emb, lang, chunks=5, resumes=4)


@pytest.mark.parametrize("auto_resume", [True, False], ids=["auto", "manual"])
@pytest.mark.parametrize("recv_into", BOTH)
def test_posts_are_made_outside_the_engine_lock(recv_into: str, auto_resume: bool) -> None:
    emb, lang = outcome(("std", recv_into, auto_resume), "posts_outside_engine_lock")
    for side in (emb, lang):
        assert side["calls"] > 5 and side["under_lock"] == [], side
    assert emb["delta"]["failures"] == lang["delta"]["failures"] == 0


@pytest.mark.parametrize("recv_into", BOTH)
def test_one_payload_op_per_wire_buffer(recv_into: str) -> None:
    emb, lang = outcome(("std", recv_into, True), "ops_per_chunk")
    # embeddings, fill_ids + positions packed, deepstack: not four ops
    assert lang["wire_buffers"] == ["embeddings", "fill_ids+mrope_positions", "deepstack"]
    assert lang["posted"] == [3], lang["posted"]
    assert_counts(emb, lang, chunks=1, resumes=0)


@pytest.mark.parametrize("recv_into", BOTH)
def test_many_rounds_one_room(recv_into: str) -> None:
    emb, lang = outcome(("std", recv_into, False), "many_rounds_one_room")
    assert lang["chunks"] == 56
    assert_counts(emb, lang, chunks=56, resumes=55)


@pytest.mark.parametrize("auto_resume", [True, False], ids=["auto", "manual"])
@pytest.mark.parametrize("recv_into", BOTH)
def test_lengths_edge_cases(recv_into: str, auto_resume: bool) -> None:
    emb, lang = outcome(("std", recv_into, auto_resume), "lengths_edge_cases")
    assert_counts(emb, lang, lang["chunks"], lang["resumes"])
    if not auto_resume:  # manual: the first chunk is exactly the block-aligned allocation
        got = {int(k): (tuple(v) if v else None) for k, v in lang["first_progress"].items()}
        assert got == lang["expected_first"]


@pytest.mark.parametrize("api", ["raw", "queue"])
@pytest.mark.parametrize("auto_resume", [True, False], ids=["auto", "manual"])
@pytest.mark.parametrize("recv_into", BOTH)
def test_concurrent_rooms_through_small_pool(recv_into: str, auto_resume: bool,
                                             api: str) -> None:
    emb, lang = outcome(("small", recv_into, auto_resume), f"concurrent_rooms_{api}")
    assert emb["delta"]["failures"] == lang["delta"]["failures"] == 0
    assert emb["delta"]["chunks"] == lang["delta"]["chunks"] >= N_CONCURRENT
    assert emb["delta"]["bytes_sent"] == lang["delta"]["bytes_received"]
    assert emb["pool_full"] > 0, "the Embedding budget never ran out: the test is too easy"
    if api == "raw":
        assert lang.get("init_false", 0) + lang.get("resume_false", 0) > 0, (
            "the Language pool never ran out: the test is too easy")


@pytest.mark.parametrize("auto_resume", [True, False], ids=["auto", "manual"])
@pytest.mark.parametrize("recv_into", BOTH)
def test_alloc_before_data(recv_into: str, auto_resume: bool) -> None:
    emb, lang = outcome(("std", recv_into, auto_resume), "alloc_before_data")
    assert set(lang["status_after_init"].values()) == {"WAITING_FOR_INPUT"}
    assert set(emb["status_after_send"].values()) <= {"TRANSFERRING", "SUCCESS"}
    assert_counts(emb, lang, chunks=1 + 1 + 2 + 2, resumes=2)


@pytest.mark.parametrize("auto_resume", [True, False], ids=["auto", "manual"])
@pytest.mark.parametrize("recv_into", BOTH)
def test_data_before_alloc(recv_into: str, auto_resume: bool) -> None:
    emb, lang = outcome(("std", recv_into, auto_resume), "data_before_alloc")
    # no ALLOC can have arrived yet: neither finished nor failed
    assert not set(emb["status_after_send"].values()) & {"SUCCESS", "FAILED"}
    assert_counts(emb, lang, chunks=1 + 1 + 2 + 2, resumes=2)


@pytest.mark.parametrize("mrope", [True, False], ids=["mrope", "no-mrope"])
@pytest.mark.parametrize("recv_into", BOTH)
def test_aux_and_extra_buffers(recv_into: str, mrope: bool) -> None:
    key = ("std", recv_into, True) if mrope else ("wide", recv_into, False)
    emb, lang = outcome(key, "aux_and_extra_buffers")
    for room, seq, aux in lang["specs"]:
        shape = lang["shapes"][room]
        assert shape["mrope"] == ((3, seq) if mrope else None)
        assert shape["deepstack"] == (seq, 3, 8)
        assert shape["aux"] == tuple(aux or ())
    assert emb["delta"]["failures"] == lang["delta"]["failures"] == 0


def test_queue_single_rank_instance() -> None:
    _, lang = outcome(("std", "output", True), "queue_single_rank_instance")
    assert lang["kinds"] == [("tuple", 2, "int", "EmbeddingResult")] * 3
    assert lang["rooms"] == lang["expected_rooms"]
    assert lang["after"] == ([], [])


def test_success_is_reported_after_blocks_are_returned() -> None:
    emb, lang = outcome(("std", "output", True), "success_is_reported_after_blocks_are_returned")
    # (room index, pool_free_blocks, pool_total_blocks, rooms_live) seen right after SUCCESS
    assert emb["lags"] == [], f"embedding rank: SUCCESS before its budget was returned: {emb['lags'][:5]}"
    assert lang["lags"] == [], f"language rank: SUCCESS before the room was released: {lang['lags'][:5]}"
