"""Real-process topology tests: the Gloo layer for multi-rank topologies.

Every test here runs real ranks as separate processes (`harness.spawn`) on Gloo
over 127.0.0.1, with the real ZeroMQ control plane and real torch.distributed
point-to-point sends; nothing is mocked. Where test_transfer.py covers one
Embedding rank and one Language rank, this file covers the shapes a deployment
has: a tensor-parallel Language instance (every TP rank receives the whole
room), several Embedding ranks feeding one Language rank, and several Language
instances fed by the same Embedding ranks.

Spawns (a few seconds each) are batched: one spawn per topology runs that
topology's scenarios one after the other, each with its own room ids, and
returns one outcome per scenario and rank; each test checks one scenario.

| spawn | world | ranks |
| --- | --- | --- |
| `e1_tp2` | 3 | Embedding 0; one instance of TP 2 (ranks 1, 2) with pools of 64 and 6 blocks, recv_into="pool", peer_timeout=3 s |
| `e2_2x1` | 4 | Embedding 0, 1; two instances of TP 1 (rank 2: recv_into="output", manual resume; rank 3: "pool", auto resume); then both instances claim one room of Embedding rank 0 |
| `e2_tp2` | 4 | Embedding 0, 1; one instance of TP 2 (ranks 2, 3), "output", manual resume, an extra buffer |

The room-claimed-twice scenarios need only one Embedding rank and two one-rank
instances; they run in `e2_2x1` with every room from Embedding rank 0
(Embedding rank 1 only joins the rendezvous), which saves a spawn.

Rules every scenario follows (as in test_transfer.py):
- comparisons are bit-exact (bf16 through `.view(torch.int16)`, ints with
  `torch.equal`) against tensors every rank rebuilds from the room id;
- every wait is a bounded loop that raises (or records) on its deadline, and
  ordering between ranks is forced with named rendezvous in the c10d store;
- Language ranks of one instance step their queues in lockstep (except where a
  scenario breaks the contract on purpose) and record per step which rooms
  came back, so the test compares the ranks' answers step by step;
- after each scenario every rank's pool is whole and `rooms_live == 0`
  (allowing the gauges a bounded moment), and strictly so before shutdown;
  shutdown itself is timed.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import math
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import torch
import torch.distributed as dist
from harness import check_whole, rank_results, spawn
from roomdata import make_data, mismatches

import disagg
from disagg import TransferStatus
from disagg.plan import scatter_slice

pytestmark = pytest.mark.timeout(180)

HIDDEN = 64
BS = 16
DEFAULT_ALLOC = 64  # 4 blocks
DEEPSTACK = {"deepstack": ((2, 8), "bfloat16")}
POLL_S = 0.001  # yield to the library's threads between polls (2 cores, 3-4 processes)
WAIT_S = 30.0  # any one bounded wait inside a scenario
SYNC_S = 45.0  # a named rendezvous of every rank
SETTLE_S = 10.0  # gauges catching up with rooms that ended on their own
SPAWN_TIMEOUT_S = 160.0
STALL_PEER_TIMEOUT_S = 3.0
STALL_SLACK_S = 4.0
SHUTDOWN_BOUND_S = 12.0

_COMMON: dict[str, Any] = dict(hidden_size=HIDDEN, block_size=BS,
                               default_alloc_tokens=DEFAULT_ALLOC, bootstrap_timeout=40.0,
                               peer_timeout=10.0)
EMB_BUDGET = 80  # blocks: 1280 tokens of unfinished rooms per Embedding rank (seq <= 600)


class Topo(NamedTuple):
    num_embedding_ranks: int
    language_tp_size: int
    world: int
    common: dict[str, Any]
    per_rank: dict[int, dict[str, Any]]  # num_blocks may differ per rank (geometry does not)
    scenarios: tuple[str, ...]
    num_rooms: int  # rooms in the "traffic" scenario


TOPOS: dict[str, Topo] = {
    "e1_tp2": Topo(1, 2, 3, {"recv_into": "pool", "peer_timeout": STALL_PEER_TIMEOUT_S,
                             "step_timeout": STALL_PEER_TIMEOUT_S},
                   {0: {"num_blocks": EMB_BUDGET}, 1: {"num_blocks": 64}, 2: {"num_blocks": 6}},
                   ("traffic", "tp_pools_differ", "success_waits_for_every_tp_rank",
                    "tp_failure_named", "ready_tokens_agreed", "progressive_parts",
                    "lockstep_order",
                    "lockstep_stall"),  # the stall breaks the instance group
                   36),
    "e2_2x1": Topo(2, 1, 4, {},
                   {0: {"num_blocks": EMB_BUDGET}, 1: {"num_blocks": EMB_BUDGET},
                    2: {"num_blocks": 12, "recv_into": "output", "auto_resume": False},
                    3: {"num_blocks": 12, "recv_into": "pool"}},
                   ("traffic", "claim_before_data", "claim_during_transfer"), 48),
    "e2_tp2": Topo(2, 2, 4, {"recv_into": "output", "auto_resume": False,
                             "extra_buffers": DEEPSTACK},
                   {0: {"num_blocks": EMB_BUDGET}, 1: {"num_blocks": EMB_BUDGET},
                    2: {"num_blocks": 10}, 3: {"num_blocks": 10}},
                   ("traffic",), 36),
    # fanout="scatter": each TP rank receives its slice, step() all-gathers
    "e1_tp2_scatter": Topo(1, 2, 3, {"recv_into": "pool", "fanout": "scatter",
                                     "peer_timeout": STALL_PEER_TIMEOUT_S},
                           {0: {"num_blocks": EMB_BUDGET}, 1: {"num_blocks": 64},
                            2: {"num_blocks": 6}},
                           ("traffic", "tp_failure_named", "ready_tokens_agreed",
                            "progressive_parts", "scatter_embedding_abort"), 30),
    # a scatter instance (ranks 1, 2) and a copy instance (ranks 3, 4) side by side
    "e1_tp2_mixed": Topo(1, 2, 5, {"recv_into": "output", "extra_buffers": DEEPSTACK},
                         {0: {"num_blocks": EMB_BUDGET},
                          1: {"num_blocks": 6, "fanout": "scatter"},
                          2: {"num_blocks": 64, "fanout": "scatter"},
                          3: {"num_blocks": 6}, 4: {"num_blocks": 64}},
                         ("traffic",), 30),
    "e1_tp3_scatter": Topo(1, 3, 4, {"recv_into": "output", "auto_resume": False,
                                     "fanout": "scatter"},
                           {0: {"num_blocks": EMB_BUDGET}, 1: {"num_blocks": 64},
                            2: {"num_blocks": 4}, 3: {"num_blocks": 10}},
                           ("traffic",), 30),
    "e1_tp4_scatter": Topo(1, 4, 5, {"recv_into": "pool", "fanout": "scatter",
                                     "extra_buffers": DEEPSTACK},
                           {0: {"num_blocks": EMB_BUDGET}, 1: {"num_blocks": 4},
                            2: {"num_blocks": 64}, 3: {"num_blocks": 6},
                            4: {"num_blocks": 4}},
                           ("traffic",), 30),
}


def fanout_of(name: str, instance: int) -> str:
    """The fanout of one Language instance of a topology (its first rank's)."""
    t = TOPOS[name]
    first = t.num_embedding_ranks + instance * t.language_tp_size
    return str({**t.common, **t.per_rank[first]}.get("fanout", "copy"))


def received_tokens(name: str, instance: int, index: int, seq: int) -> int:
    """Tokens of a `seq`-token room that TP rank `index` of `instance` receives."""
    if fanout_of(name, instance) == "copy":
        return seq
    lo, hi = scatter_slice(seq, TOPOS[name].language_tp_size, index)
    return hi - lo


def make_cfg(name: str, rank: int) -> disagg.DisaggConfig:
    t = TOPOS[name]
    return disagg.DisaggConfig(num_embedding_ranks=t.num_embedding_ranks,
                               language_tp_size=t.language_tp_size,
                               **{**_COMMON, **t.common, **t.per_rank[rank]})


def token_nbytes(name: str) -> int:
    """Bytes one token carries over the wire, from the spec's buffer table."""
    t = TOPOS[name]
    extra = t.common.get("extra_buffers", {})
    n = HIDDEN * 2 + 4 + (12 if t.common.get("mrope", True) else 0)
    n += sum(math.prod(shape) * (2 if dt == "bfloat16" else 4) for shape, dt in extra.values())
    return n


class Spec(NamedTuple):
    room: int
    seq: int
    src: int  # Embedding rank that sends it
    instance: int  # Language instance that receives it
    aux: tuple[int, ...]


def aux_of(room: int, seq: int) -> tuple[int, ...]:
    return (room % 97 - 50, -(1 << 63), (1 << 63) - 1, -1, 0, seq, (1 << 40) + room)


def traffic_specs(name: str, base: int) -> list[Spec]:
    """Seeded random lengths (1..600, the edges first) crossing every
    (Embedding rank, Language instance) combination."""
    t = TOPOS[name]
    n_inst = (t.world - t.num_embedding_ranks) // t.language_tp_size
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    edges = [600, 1, BS, BS + 1, DEFAULT_ALLOC + 1, 2, 3, 5]  # 1-5: scatter's empty slices
    seqs = [*edges, *torch.randint(1, 601, (t.num_rooms,), generator=g).tolist()][:t.num_rooms]
    e = t.num_embedding_ranks
    return [Spec(base + i, s, i % e, (i // e) % n_inst,
                 () if i % 5 == 3 else aux_of(base + i, s)) for i, s in enumerate(seqs)]


# ---------------------------------------------------------------------------
# in-rank helpers (run inside the spawned processes)
# ---------------------------------------------------------------------------


def digest(res: disagg.EmbeddingResult) -> str:
    """A hash of every byte of a result, to compare TP ranks with each other."""
    h = hashlib.sha256()
    tensors = [res.embeddings, res.fill_ids, res.mrope_positions,
               *(res.extra[n] for n in sorted(res.extra))]
    for t in tensors:
        if t is None:
            h.update(b"none")
        else:
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(repr(tuple(res.aux)).encode())
    return h.hexdigest()


class Deadline:
    def __init__(self, seconds: float, what: str) -> None:
        self.at = time.monotonic() + seconds
        self.seconds = seconds
        self.what = what

    @property
    def passed(self) -> bool:
        return time.monotonic() > self.at

    def check(self, detail: Callable[[], str] = lambda: "") -> None:
        if self.passed:
            raise TimeoutError(f"{self.what}: not done within {self.seconds:g}s; {detail()}")


COUNTERS = ("chunks", "resumes", "failures", "bytes_sent", "bytes_received")


@dataclass
class Env:
    """What a scenario gets: the context, named rendezvous, room ids, counter deltas."""

    ctx: Any
    cfg: disagg.DisaggConfig
    topo: str
    scenario: str
    base: int
    store: Any
    before: dict[str, Any]

    @property
    def rank(self) -> int:
        return int(self.ctx.rank)

    @property
    def world(self) -> int:
        return int(self.ctx.world_size)

    @property
    def embedding(self) -> bool:
        return self.ctx.role == "embedding"

    def room(self, i: int) -> int:
        return self.base + i

    def sync(self, tag: str, timeout: float = SYNC_S) -> None:
        """Every rank reaches `tag` before any goes on (named, bounded)."""
        key = f"topo/{self.scenario}/{tag}"
        self.store.set(f"{key}/{self.rank}", b"1")
        self.store.wait([f"{key}/{r}" for r in range(self.world)],
                        datetime.timedelta(seconds=timeout))

    def delta(self) -> dict[str, int]:
        now = self.ctx.stats()
        return {k: int(now[k]) - int(self.before[k]) for k in COUNTERS}


def settle_whole(ctx: Any, when: str, timeout: float = SETTLE_S) -> None:
    dl = Deadline(timeout, f"{ctx.role} rank {ctx.rank}: pool whole {when}")
    while True:
        try:
            check_whole(ctx, when)
            return
        except AssertionError as e:
            dl.check(lambda e=e: str(e))
        time.sleep(POLL_S)


# -- Embedding side --------------------------------------------------------


def embedding_stream(env: Env, specs: list[Spec]) -> dict[str, Any]:
    """Send this rank's rooms strictly in order as the budget allows (PoolFull:
    retry later), keep each room's tensors until its sender is SUCCESS; read the
    counters the moment every sender is SUCCESS."""
    todo = collections.deque(s for s in specs if s.src == env.rank)
    live: dict[int, tuple[Any, dict[str, Any]]] = {}
    pending: tuple[Spec, Any, dict[str, Any]] | None = None
    pool_full = 0
    dl = Deadline(2 * WAIT_S, f"embedding rank {env.rank}: stream")
    while todo or live or pending:
        while todo or pending:
            if pending is None:
                sp = todo.popleft()
                pending = (sp, env.ctx.embedding.sender(sp.room), make_data(env.cfg, sp.room,
                                                                            sp.seq))
            sp, s, data = pending
            try:
                s.send(data["embeddings"], data["fill_ids"], data["mrope_positions"],
                       aux=sp.aux or None, **data["extra"])
            except disagg.PoolFull:
                pool_full += 1
                break
            live[sp.room] = (s, data)
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
    return {"delta": env.delta(), "pool_full": pool_full,
            "bytes_per_room": env.ctx.stats()["bytes_per_room"]}


def send_all(env: Env, specs: list[Spec]) -> dict[int, tuple[Any, dict[str, Any]]]:
    out = {}
    for sp in specs:
        data = make_data(env.cfg, sp.room, sp.seq)
        s = env.ctx.embedding.sender(sp.room)
        s.send(data["embeddings"], data["fill_ids"], data["mrope_positions"],
               aux=sp.aux or None, **data["extra"])
        out[sp.room] = (s, data)
    return out


def wait_end(s: Any, timeout: float = WAIT_S) -> TransferStatus:
    """Poll a Sender or Receiver until SUCCESS or FAILED; the status at the deadline
    otherwise (the caller reports it)."""
    dl = Deadline(timeout, "room")
    while (st := s.poll()) not in (TransferStatus.SUCCESS, TransferStatus.FAILED):
        if dl.passed:
            return st
        time.sleep(POLL_S)
    return st


def await_senders(senders: dict[int, tuple[Any, Any]], timeout: float = WAIT_S, *,
                  lost_agreement: bool = False) -> None:
    """Every sender SUCCESS; with `lost_agreement`, FAILED too where the Language
    instance's queue lost its agreement and failed its rooms (issue 27)."""
    for room, (s, _) in senders.items():
        st = wait_end(s, timeout)
        if st == TransferStatus.SUCCESS or (
                lost_agreement and "agreement is lost" in str(s.failure)):
            continue
        raise AssertionError(f"sender {room}: {st.name} ({s.failure})")


# -- Language side ----------------------------------------------------------


class CallCounts:
    """Counts init()/resume() results of every Receiver in this process while
    active: proof that the small pools really made the queue retry."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def __enter__(self) -> CallCounts:
        cls = disagg.Receiver
        self._real = (cls.init, cls.resume)
        real_init, real_resume = self._real
        counts = self.counts

        def init(r: Any, num_tokens: int | None = None, **kw: Any) -> bool:
            ok = real_init(r, num_tokens, **kw)
            counts["init_true" if ok else "init_false"] += 1
            return ok

        def resume(r: Any, num_tokens: int | None = None) -> bool:
            ok = real_resume(r, num_tokens)
            counts["resume_true" if ok else "resume_false"] += 1
            return ok

        cls.init, cls.resume = init, resume  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        disagg.Receiver.init, disagg.Receiver.resume = self._real  # type: ignore[method-assign]


def queue_until_done(env: Env, specs: list[Spec]) -> dict[str, Any]:
    """This rank's instance's rooms through ctx.language.queue(): added in spec
    order, stepped until every room came back done or failed. Nothing raises
    mid-loop (that would break lockstep for the other TP ranks): mismatches and
    failures are recorded and checked by the test."""
    mine = [s for s in specs if s.instance == env.ctx.instance]
    by_room = {s.room: s for s in mine}
    q = env.ctx.language.queue()
    for s in mine:
        q.add(s.room, src_rank=s.src)
    log: list[tuple[int, list[int], list[int]]] = []  # (step, done rooms, failed rooms)
    digests: dict[int, str] = {}
    failures: dict[int, str] = {}
    bad: list[str] = []
    steps = 0
    dl = Deadline(2 * WAIT_S, f"language rank {env.rank}: queue")
    with CallCounts() as calls:
        while len(digests) + len(failures) < len(mine):
            done, failed = q.step()
            if done or failed:
                log.append((steps, [room for room, _ in done], [room for room, _ in failed]))
            steps += 1
            for room, res in done:
                sp = by_room[room]
                bad += mismatches(res, make_data(env.cfg, room, sp.seq), sp.aux, room, sp.seq)
                if room in digests:
                    bad.append(f"room {room} returned twice")
                digests[room] = digest(res)
            failures.update({room: str(why) for room, why in failed})
            dl.check(lambda: f"{len(digests)} done, {len(failures)} failed, {len(q)} queued; "
                             f"stats {env.ctx.stats()}")
            time.sleep(POLL_S)
    return {"bytes_per_room": env.ctx.stats()["bytes_per_room"],
            "log": log, "steps": steps, "digests": digests, "failures": failures, "bad": bad,
            "left_in_queue": len(q), "calls": dict(calls.counts), "delta": env.delta()}


def drive(r: Any, timeout: float = WAIT_S) -> TransferStatus:
    """One raw receiver (already initialised) to SUCCESS or FAILED, resuming
    whenever it needs to; the status at the deadline otherwise."""
    dl = Deadline(timeout, "receiver")
    while (st := r.poll()) not in (TransferStatus.SUCCESS, TransferStatus.FAILED):
        if dl.passed:
            return st
        if r.needs_resume:
            r.resume()
        time.sleep(POLL_S)
    return st


# ---------------------------------------------------------------------------
# scenarios: each runs on every rank and returns a small picklable summary
# ---------------------------------------------------------------------------


def sc_traffic(env: Env) -> dict[str, Any]:
    """Many rooms of seeded random lengths from every Embedding rank to every
    Language instance at once, through small pools (PoolFull on the Embedding
    side; init/resume retries and resumes on the Language side)."""
    specs = traffic_specs(env.topo, env.base)
    if env.embedding:
        return embedding_stream(env, specs)
    return queue_until_done(env, specs)


def sc_tp_pools_differ(env: Env) -> dict[str, Any]:
    """TP rank 1's pool is 64 blocks, TP rank 2's 6 (96 tokens): the same rooms,
    one at a time through the queue, are chunked differently on the two ranks
    (each rank allocates and resumes on its own), yet arrive identical."""
    specs = [Spec(env.room(i), s, 0, 0, aux_of(env.room(i), s))
             for i, s in enumerate([600, 333, 97])]
    if env.embedding:
        senders = send_all(env, specs)
        await_senders(senders)
        return {"delta": env.delta()}
    out: dict[str, Any] = {"log": [], "digests": {}, "bad": [], "failures": {}}
    q = env.ctx.language.queue()
    steps = 0
    dl = Deadline(WAIT_S, f"language rank {env.rank}: one room at a time")
    for sp in specs:  # the next room only once the previous came back on every TP rank
        q.add(sp.room, src_rank=0)
        while len(q):
            done, failed = q.step()
            steps += 1
            if done or failed:
                out["log"].append((steps, [r for r, _ in done], [r for r, _ in failed]))
            for room, res in done:
                out["bad"] += mismatches(res, make_data(env.cfg, room, sp.seq), sp.aux, room, sp.seq)
                out["digests"][room] = digest(res)
            out["failures"].update({room: str(why) for room, why in failed})
            dl.check(lambda sp=sp: f"room {sp.room}; stats {env.ctx.stats()}")
            time.sleep(POLL_S)
    st = env.ctx.stats()
    return {**out, "steps": steps, "delta": env.delta(),
            "pool_total_blocks": st["pool_total_blocks"]}


def sc_success_waits_for_every_tp_rank(env: Env) -> dict[str, Any]:
    """TP rank 1 receives the whole room while TP rank 2 has not even sent its
    ALLOC: the sender must not be SUCCESS yet (its own byte count already shows
    TP rank 1's share sent); only once TP rank 2 received it too."""
    sp = Spec(env.room(0), 300, 0, 0, aux_of(env.room(0), 300))
    nbytes = sp.seq * token_nbytes(env.topo)
    out: dict[str, Any] = {}
    if env.embedding:
        s, _data = send_all(env, [sp])[sp.room]
        env.sync("sent")
        env.sync("tp0_has_all")
        dl = Deadline(WAIT_S, "the first TP rank's share counted as sent")
        while env.delta()["bytes_sent"] < nbytes:
            dl.check(lambda: str(env.delta()))
            time.sleep(POLL_S)
        out["status_after_first_tp_rank"] = s.poll().name
        out["bytes_sent_then"] = env.delta()["bytes_sent"]
        env.sync("checked")
        out["final"] = wait_end(s).name
        out["failure"] = s.failure
        out["delta"] = env.delta()
        return out
    env.sync("sent")
    first = env.rank == env.ctx.topology.instance_ranks(env.ctx.instance)[0]
    if not first:
        env.sync("tp0_has_all")
        env.sync("checked")
    r = env.ctx.language.receiver(sp.room, src_rank=0)
    if not r.init():
        raise AssertionError(f"init() found no blocks in an idle pool: {env.ctx.stats()}")
    out["final"] = drive(r).name
    out["failure"] = r.failure
    out["bad"] = (mismatches(r.result(), make_data(env.cfg, sp.room, sp.seq), sp.aux, sp.room, sp.seq)
                  if r.poll() == TransferStatus.SUCCESS else [])
    if first:
        env.sync("tp0_has_all")
        env.sync("checked")
    out["delta"] = env.delta()
    return out


def sc_tp_failure_named(env: Env) -> dict[str, Any]:
    """Through the queue, the second TP rank alone aborts a room: step() fails it
    on both ranks in the same step, the aborting rank with its own reason, the
    other naming the rank that failed (DESIGN: each rank's reason is its own)."""
    sp = Spec(env.room(0), 200, 0, 0, aux_of(env.room(0), 200))
    if env.embedding:
        s, _ = send_all(env, [sp])[sp.room]
        env.sync("added")
        return {"final": wait_end(s).name, "failure": s.failure}
    engine = env.ctx.language.engine
    mine: list[Any] = []
    real = engine.receiver

    def keep(room: int, src_rank: int) -> Any:  # the handles the queue makes
        r = real(room, src_rank)
        mine.append(r)
        return r

    engine.receiver = keep  # type: ignore[method-assign]
    try:
        q = env.ctx.language.queue()
        q.add(sp.room, src_rank=0)
    finally:
        del engine.receiver
    env.sync("added")
    aborter = env.ctx.topology.instance_ranks(env.ctx.instance)[1]
    if env.rank == aborter:
        mine[0].abort("the scheduler dropped the request")
    return {"failed": step_until_failed(env, q), "aborter": aborter}


def step_until_failed(env: Env, q: Any) -> list[tuple[int, str]]:
    """Step a one-room queue until the room comes back failed (done is an error)."""
    failed: list[tuple[int, str]] = []
    dl = Deadline(WAIT_S, "the aborted room to come back failed")
    while not failed:
        done, failed = q.step()
        if done:
            raise AssertionError(f"room came back done: {done}")
        dl.check(lambda: str(env.ctx.stats()))
        time.sleep(POLL_S)
    return failed


def sc_ready_tokens_agreed(env: Env) -> dict[str, Any]:
    """A long room through the queue on TP ranks whose pools (64 and 6 blocks)
    chunk it differently: at every step, ready_tokens is the same on both
    ranks, never decreases, and q.prefix holds exactly those bytes."""
    sp = Spec(env.room(0), 900, 0, 0, aux_of(env.room(0), 900))
    if env.embedding:
        s, _ = send_all(env, [sp])[sp.room]
        return {"final": wait_end(s).name}
    data = make_data(env.cfg, sp.room, sp.seq)
    q = env.ctx.language.queue()
    q.add(sp.room, src_rank=0)
    bad: list[str] = []

    def check_prefix(n: int) -> None:
        p = q.prefix(sp.room)
        if not (p.embeddings.shape[0] == n
                and torch.equal(p.embeddings.view(torch.int16),
                                data["embeddings"][:n].view(torch.int16))
                and torch.equal(p.fill_ids, data["fill_ids"][:n])):
            bad.append(f"prefix of {n} tokens differs")

    ready, done, failed = step_until_returned(q, sp.room, check_prefix)
    return {"ready": ready, "bad": bad, "done": [r for r, _ in done], "failed": failed}


def step_until_returned(q: Any, room: int, each: Callable[[int], None] = lambda n: None
                        ) -> tuple[list[int], list[Any], list[Any]]:
    """Step a one-room queue until it returns the room; the agreed ready_tokens at
    every step before (each also given to `each`), then step()'s lists."""
    ready: list[int] = []
    dl = Deadline(WAIT_S, f"room {room} through the queue")
    while True:
        done, failed = q.step()
        if done or failed:
            return ready, done, failed
        ready.append(q.ready_tokens(room))
        each(ready[-1])
        dl.check(lambda: f"ready {ready[-5:]}")
        time.sleep(POLL_S)


def sc_progressive_parts(env: Env) -> dict[str, Any]:
    """A room sent image by image (progressive send) to a TP-2 instance whose
    pools (64 and 6 blocks) chunk it differently: bit-exact on both ranks,
    ready_tokens identical at every step and never decreasing."""
    seq, parts = 700, [150, 250, 100, 200]
    sp = Spec(env.room(0), seq, 0, 0, aux_of(env.room(0), seq))
    data = make_data(env.cfg, sp.room, seq)
    if env.embedding:
        s = env.ctx.embedding.sender(sp.room)
        env.sync("queued")
        a = 0
        for i, n in enumerate(parts):
            time.sleep(0.02)  # the encoder
            mrope = data["mrope_positions"]
            s.send(data["embeddings"][a:a + n], data["fill_ids"][a:a + n],
                   None if mrope is None else mrope[:, a:a + n],
                   **({"seq_len": seq, "aux": sp.aux} if i == 0 else {}),
                   **{k: v[a:a + n] for k, v in data["extra"].items()})
            a += n
        return {"final": wait_end(s).name, "failure": s.failure}
    q = env.ctx.language.queue()
    q.add(sp.room, src_rank=0, seq_len=seq)
    env.sync("queued")
    ready, done, failed = step_until_returned(q, sp.room)
    bad = mismatches(done[0][1], data, sp.aux, sp.room, seq) if done else ["not done"]
    return {"ready": ready, "bad": bad, "failed": failed}


def sc_scatter_embedding_abort(env: Env) -> dict[str, Any]:
    """fanout="scatter": the Embedding rank gives the first 100 of 400 tokens
    (TP rank 1's slice is [0, 200), rank 2's [200, 400)), rank 1's first chunk
    lands, then the Embedding caller aborts: rank 2's allocation is answered by
    an ABORT frame, rank 1 learns by REJECT or ABORT frame; the room fails on
    both ranks in the same step, every block comes back."""
    seq = 400
    sp = Spec(env.room(0), seq, 0, 0, aux_of(env.room(0), seq))
    data = make_data(env.cfg, sp.room, seq)
    if env.embedding:
        s = env.ctx.embedding.sender(sp.room)
        s.send(data["embeddings"][:100], data["fill_ids"][:100],
               data["mrope_positions"][:, :100], aux=sp.aux, seq_len=seq,
               **{k: v[:100] for k, v in data["extra"].items()})
        dl = Deadline(WAIT_S, "rank 1's first chunk")
        while env.delta()["chunks"] < 1:
            dl.check(lambda: str(env.ctx.stats()))
            time.sleep(POLL_S)
        s.abort("the encoder crashed")
        return {"final": wait_end(s).name, "failure": s.failure}
    q = env.ctx.language.queue()
    q.add(sp.room, src_rank=0)
    return {"failed": step_until_failed(env, q), "received": env.delta()["bytes_received"]}


def _lockstep_rooms(env: Env, seqs: list[int]) -> list[Spec]:
    return [Spec(env.room(i), s, 0, 0, aux_of(env.room(i), s)) for i, s in enumerate(seqs)]


def sc_lockstep_order(env: Env) -> dict[str, Any]:
    """The TP ranks add the same two rooms in different orders: the first
    step() raises LockstepError on both (not a silently different answer), and
    the queue fails its rooms (their source is told; a room whose last chunk
    was already on the wire completes), so every pool ends whole."""
    specs = _lockstep_rooms(env, [100, 200])
    if env.embedding:
        await_senders(send_all(env, specs), lost_agreement=True)
        return {"delta": env.delta()}
    q = env.ctx.language.queue()
    order = specs if env.rank == env.ctx.topology.instance_ranks(0)[0] else specs[::-1]
    for sp in order:
        q.add(sp.room, src_rank=0)
    out: dict[str, Any] = {"error": None, "steps_ok": 0}
    dl = Deadline(WAIT_S, "lockstep order")
    while len(q) and not dl.passed:  # bounded even if the violation went unnoticed
        t0 = time.monotonic()
        try:
            q.step()
        except disagg.LockstepError as e:
            out.update(error=str(e), error_type=type(e).__name__,
                       elapsed=time.monotonic() - t0)
            break
        out["steps_ok"] += 1
        time.sleep(POLL_S)
    settle_whole(env.ctx, "after the rooms of a broken queue landed", WAIT_S)
    return out


STALL_AFTER_STEPS = 2


def sc_lockstep_stall(env: Env) -> dict[str, Any]:
    """TP rank 2 stops calling step() after two steps while TP rank 1 keeps
    stepping: TP rank 1 gets LockstepError within step_timeout (+ slack), not a
    hang, and its queue fails its rooms. Every pool still ends whole. Must be
    the last scenario of its spawn: the instance group has a timed-out
    collective behind it."""
    specs = _lockstep_rooms(env, [40, 500])
    if env.embedding:
        senders = send_all(env, specs)
        env.sync("stall_seen", timeout=SYNC_S)
        await_senders(senders, lost_agreement=True)
        return {"delta": env.delta()}
    q = env.ctx.language.queue()
    for sp in specs:
        q.add(sp.room, src_rank=0)
    stepper = env.rank == env.ctx.topology.instance_ranks(0)[0]
    out: dict[str, Any] = {"stepper": stepper, "error": None, "steps_ok": 0}
    if stepper:
        dl = Deadline(env.cfg.step_timeout + 3 * STALL_SLACK_S, "stall")
        while not dl.passed:  # bounded even if the stall went unnoticed
            t0 = time.monotonic()
            try:
                q.step()
            except disagg.LockstepError as e:
                out.update(error=str(e), error_type=type(e).__name__,
                           elapsed=time.monotonic() - t0)
                break
            out["steps_ok"] += 1
            time.sleep(POLL_S)
    else:
        for _ in range(STALL_AFTER_STEPS):
            q.step()
            out["steps_ok"] += 1
    env.sync("stall_seen", timeout=SYNC_S)
    settle_whole(env.ctx, "after the stall", WAIT_S)
    return out


def _claim(env: Env, room: int, seq: int, data_first: bool) -> dict[str, Any]:
    """Language instance 0 claims `room` of Embedding rank 0 first (with manual
    resume); instance 1 then makes receiver(room, src_rank=0) and init() too.
    Nothing raises on the Language side: the test judges what each rank saw."""
    sp = Spec(room, seq, 0, 0, aux_of(room, seq))
    topo = env.ctx.topology
    first, second = topo.instance_ranks(0)[0], topo.instance_ranks(1)[0]
    assert not env.cfg.auto_resume or env.rank != first
    out: dict[str, Any] = {}
    sender: Any = None
    if env.rank == 0 and data_first:
        sender = send_all(env, [sp])[room][0]
    env.sync("data_or_not")
    r: Any = None
    if env.rank == first:  # instance 0: the first claim
        r = env.ctx.language.receiver(room, src_rank=0)
        out["init"] = r.init(2 * BS if data_first else None)
        if data_first:  # manual resume: the room holds still, partly landed
            dl = Deadline(WAIT_S, f"room {room}: first partial chunk")
            while not r.needs_resume:
                dl.check(lambda: f"{r.poll().name} {r.progress} {r.failure}")
                time.sleep(POLL_S)
        out["status_before_second_claim"] = r.poll().name
        out["progress_before_second_claim"] = r.progress
    env.sync("first_claim")
    if env.rank == 0 and not data_first:
        # white-box, optional: wait until the first ALLOC is really in (an ALLOC
        # that waits for data); without the table the rendezvous orders it
        early = getattr(env.ctx.embedding, "_early", None)
        dl = Deadline(WAIT_S, "the first ALLOC arriving")
        while early is not None and first not in early.get(room, {}):
            dl.check(lambda: f"early ALLOCs {dict(early)}")
            time.sleep(POLL_S)
    env.sync("first_claim_seen")
    if env.rank == second:  # instance 1: the second claim
        r2 = env.ctx.language.receiver(room, src_rank=0)
        out["init"] = r2.init()
        st = wait_end(r2, 10.0)
        out["second_status"] = st.name
        out["second_failure"] = r2.failure
        if st not in (TransferStatus.SUCCESS, TransferStatus.FAILED):
            r2.abort("test cleanup: the second claim was never answered")
    env.sync("second_claim")
    if env.rank == 0:
        if sender is None:
            sender = send_all(env, [sp])[room][0]
        out["sender_status"] = wait_end(sender).name
        out["sender_failure"] = sender.failure
    if env.rank == first:
        st = drive(r)
        out["first_status"] = st.name
        out["first_failure"] = r.failure
        out["bad"] = (mismatches(r.result(), make_data(env.cfg, room, seq), sp.aux, room, seq)
                      if st == TransferStatus.SUCCESS else None)
        if st not in (TransferStatus.SUCCESS, TransferStatus.FAILED):
            r.abort("test cleanup")
    env.sync("ended")
    settle_whole(env.ctx, f"after room {room} was claimed twice", WAIT_S)
    out["delta"] = env.delta()
    return out


def sc_claim_before_data(env: Env) -> dict[str, Any]:
    """Both instances' ALLOCs reach the Embedding rank before send()."""
    return _claim(env, 7, 150, data_first=False)


def sc_claim_during_transfer(env: Env) -> dict[str, Any]:
    """send() first; instance 0's room is partly landed (manual resume) when
    instance 1's ALLOC for the same room arrives."""
    return _claim(env, 8, 300, data_first=True)


SCENARIOS: dict[str, Callable[[Env], dict[str, Any]]] = {
    "traffic": sc_traffic,
    "tp_pools_differ": sc_tp_pools_differ,
    "success_waits_for_every_tp_rank": sc_success_waits_for_every_tp_rank,
    "tp_failure_named": sc_tp_failure_named,
    "ready_tokens_agreed": sc_ready_tokens_agreed,
    "progressive_parts": sc_progressive_parts,
    "lockstep_order": sc_lockstep_order,
    "lockstep_stall": sc_lockstep_stall,
    "claim_before_data": sc_claim_before_data,
    "claim_during_transfer": sc_claim_during_transfer,
    "scatter_embedding_abort": sc_scatter_embedding_abort,
}


def run_topology(rank: int, world: int, init_method: str, name: str) -> dict[str, Any]:
    """Spawned on every rank: run the topology's scenarios in order; after one
    fails on any rank the rest are skipped (the context may be damaged)."""
    topo = TOPOS[name]
    assert world == topo.world
    cfg = make_cfg(name, rank)
    t_init = time.monotonic()
    ctx = disagg.init(cfg, rank=rank, world_size=world, init_method=init_method)
    out: dict[str, Any] = {"role": ctx.role, "instance": ctx.instance, "outcomes": {},
                           "seconds": {}}
    outcomes = out["outcomes"]
    out["seconds"]["init"] = time.monotonic() - t_init
    try:
        store = dist.distributed_c10d._get_default_store()
        broken = None
        for i, sc in enumerate(topo.scenarios):
            if broken is not None:
                outcomes[sc] = ("skipped", f"not run: {broken!r} failed earlier in {name}")
                continue
            env = Env(ctx, cfg, name, sc, (i + 1) << 20, store, ctx.stats())
            t0 = time.monotonic()
            try:
                res = SCENARIOS[sc](env)
                settle_whole(ctx, f"after scenario {sc}")
                outcomes[sc] = ("ok", res)
            except Exception:
                outcomes[sc] = ("error", traceback.format_exc())
            store.set(f"topo/{sc}/result/{rank}", outcomes[sc][0].encode())
            env.sync("outcome")
            out["seconds"][sc] = time.monotonic() - t0
            if any(store.get(f"topo/{sc}/result/{r}").decode() != "ok" for r in range(world)):
                broken = sc
        Env(ctx, cfg, name, "__final__", 0, store, {}).sync("end")
        try:
            out["final"] = ("ok", check_whole(ctx, "before shutdown"))
        except AssertionError as e:
            out["final"] = ("error", str(e))
    finally:
        t0 = time.monotonic()
        ctx.shutdown()
        out["shutdown_s"] = time.monotonic() - t0
    return out


# ---------------------------------------------------------------------------
# test side
# ---------------------------------------------------------------------------

_RUNS: dict[str, tuple[str, Any]] = {}


def ranks_of(name: str, name_scenario: str) -> list[Any]:
    """Every rank's summary of one scenario (running the topology's spawn on
    first use); fails with every rank's story if any rank did not finish it."""
    topo = TOPOS[name]
    assert name_scenario in topo.scenarios
    if name not in _RUNS:
        try:
            _RUNS[name] = ("ok", spawn(topo.world, run_topology, name,
                                       timeout=SPAWN_TIMEOUT_S))
        except Exception as e:  # every test of the topology reports it
            _RUNS[name] = ("error", e)
    kind, value = _RUNS[name]
    if kind == "error":
        raise AssertionError(f"topology {name} did not complete: {value}")
    results = rank_results([value[r]["outcomes"][name_scenario] for r in range(topo.world)],
                           f"scenario {name_scenario} in topology {name}")
    if all(k == "ok" for v in value for k, _ in v["outcomes"].values()):
        for r, v in enumerate(value):  # the whole run ended with every pool whole
            assert v["final"][0] == "ok", f"rank {r}: {v['final'][1]}"
            assert v["shutdown_s"] < SHUTDOWN_BOUND_S, f"rank {r}: shutdown {v['shutdown_s']}s"
    return results


def instances(name: str) -> list[list[int]]:
    t = TOPOS[name]
    e, tp = t.num_embedding_ranks, t.language_tp_size
    return [list(range(s, s + tp)) for s in range(e, t.world, tp)]


@pytest.mark.parametrize("name", ["e1_tp2", "e2_2x1", "e2_tp2", "e1_tp2_scatter",
                                  "e1_tp2_mixed", "e1_tp3_scatter", "e1_tp4_scatter"])
def test_traffic_every_room_bit_exact_on_every_tp_rank(name: str) -> None:
    res = ranks_of(name, "traffic")
    t = TOPOS[name]
    specs = traffic_specs(name, 1 << 20)
    e = t.num_embedding_ranks
    for inst, ranks in enumerate(instances(name)):
        want = sorted(s.room for s in specs if s.instance == inst)
        # cross traffic: every instance is fed by every Embedding rank
        assert {s.src for s in specs if s.instance == inst} == set(range(e))
        for r in ranks:
            assert res[r]["bad"] == [], f"rank {r}: {res[r]['bad'][:5]}"
            assert res[r]["failures"] == {}, f"rank {r}: {list(res[r]['failures'].items())[:3]}"
            assert sorted(res[r]["digests"]) == want, f"rank {r}: rooms differ"
            assert res[r]["left_in_queue"] == 0
        # identical answers, in the same order, at the same step, on every TP rank
        first = res[ranks[0]]
        for r in ranks[1:]:
            assert res[r]["steps"] == first["steps"], (r, res[r]["steps"], first["steps"])
            assert res[r]["log"] == first["log"], f"rank {r} disagrees with rank {ranks[0]}"
            assert res[r]["digests"] == first["digests"]
        returned = [room for _, done, _ in first["log"] for room in done]
        assert sorted(returned) == want and len(returned) == len(set(returned))
    # each Embedding rank sends each of its rooms to each TP rank of the instance
    # separately: all of it ("copy"), or the rank's slice ("scatter"); each
    # Language rank counts what it received
    nb = token_nbytes(name)
    tp = t.language_tp_size

    def sent(s: Spec) -> int:
        return nb * sum(received_tokens(name, s.instance, i, s.seq) for i in range(tp))

    for r in range(e):
        assert res[r]["delta"]["bytes_sent"] == sum(sent(s) for s in specs if s.src == r), r
    for inst, ranks in enumerate(instances(name)):
        for i, r in enumerate(ranks):
            assert res[r]["delta"]["bytes_received"] == nb * sum(
                received_tokens(name, inst, i, s.seq) for s in specs if s.instance == inst), r
    emb, lang = res[:e], res[e:]
    total = sum(sent(s) for s in specs)
    assert sum(x["delta"]["bytes_sent"] for x in emb) == total
    assert sum(x["delta"]["bytes_received"] for x in lang) == total
    assert sum(x["delta"]["chunks"] for x in emb) == sum(x["delta"]["chunks"] for x in lang)
    assert sum(x["delta"]["resumes"] for x in emb) == sum(x["delta"]["resumes"] for x in lang)
    assert all(x["delta"]["failures"] == 0 for x in res), [x["delta"] for x in res]
    # the pools were small enough to matter
    assert sum(x["delta"]["resumes"] for x in lang) > 0
    assert sum(x["pool_full"] for x in emb) > 0, "no Embedding budget ever ran out"
    assert sum(x["calls"].get("init_false", 0) for x in lang) > 0, "init() never had to retry"


def expected_chunks(seq: int, first_tokens: int, pool_blocks: int) -> int:
    """Chunks the spec implies for one room alone on a rank: whole-block
    allocations capped at the pool, each chunk min(remaining, allocated)."""
    allocated = min(math.ceil(first_tokens / BS), pool_blocks) * BS
    n, got = 0, 0
    while got < seq:
        got += min(seq - got, allocated)
        n += 1
        allocated = min(math.ceil((seq - got) / BS), pool_blocks) * BS
    return n


def test_tp_ranks_allocate_and_resume_on_their_own() -> None:
    res = ranks_of("e1_tp2", "tp_pools_differ")
    emb, a, b = res
    assert a["pool_total_blocks"] == 64 and b["pool_total_blocks"] == 6
    for x in (a, b):
        assert x["bad"] == [] and x["failures"] == {}, x
    assert a["digests"] == b["digests"] and len(a["digests"]) == 3
    assert a["log"] == b["log"] and a["steps"] == b["steps"]
    seqs = [600, 333, 97]
    want = [sum(expected_chunks(s, DEFAULT_ALLOC, blocks) for s in seqs) for blocks in (64, 6)]
    assert want == [6, 13]
    got = [a["delta"]["chunks"], b["delta"]["chunks"]]
    assert got == want, f"chunks per TP rank {got}, expected {want}"
    assert emb["delta"]["chunks"] == sum(got)
    assert a["delta"]["bytes_received"] == b["delta"]["bytes_received"] == \
        sum(seqs) * token_nbytes("e1_tp2")
    assert emb["delta"]["bytes_sent"] == 2 * a["delta"]["bytes_received"]


def test_sender_success_waits_for_every_tp_rank() -> None:
    emb, a, b = ranks_of("e1_tp2", "success_waits_for_every_tp_rank")
    nb = 300 * token_nbytes("e1_tp2")
    assert emb["bytes_sent_then"] == nb, emb  # the first TP rank's share, all of it
    assert emb["status_after_first_tp_rank"] not in ("SUCCESS", "FAILED"), emb
    assert emb["final"] == "SUCCESS", emb
    for x in (a, b):
        assert x["final"] == "SUCCESS" and x["bad"] == [], x
    assert emb["delta"]["bytes_sent"] == 2 * nb


@pytest.mark.parametrize("name", ["e1_tp2", "e1_tp2_scatter"])
def test_tp_failure_names_the_rank_that_failed(name: str) -> None:
    emb, a, b = ranks_of(name, "tp_failure_named")
    aborter = a["aborter"]
    (room, own), = (b if aborter == 2 else a)["failed"]
    (room2, other), = (a if aborter == 2 else b)["failed"]
    assert room == room2
    assert "the scheduler dropped the request" in own, own
    # Each rank's reason is its own: the other rank either learnt it from the
    # Embedding rank (the aborted room refused its ALLOC) or from the queue's
    # agreement, which names the rank that failed; both name the aborting rank.
    queue_words = f"room {room} failed on language rank {aborter} of the TP instance"
    assert other.startswith(queue_words) or f"aborted by language rank {aborter}" in other, other
    assert emb["final"] == "FAILED", emb


@pytest.mark.parametrize("name", ["e1_tp2", "e1_tp2_scatter"])
def test_ready_tokens_identical_on_every_tp_rank_and_never_decreasing(name: str) -> None:
    emb, a, b = ranks_of(name, "ready_tokens_agreed")
    if name.endswith("scatter"):  # each rank holds a slice, not a prefix, until the gather
        assert set(a["ready"]) == {0}, a["ready"]
    assert emb["final"] == "SUCCESS", emb
    assert a["ready"] == b["ready"], (a["ready"], b["ready"])  # the same at every step
    assert a["ready"] == sorted(a["ready"]), a["ready"]
    assert a["bad"] == b["bad"] == []
    assert a["done"] == b["done"] and len(a["done"]) == 1 and a["failed"] == []


@pytest.mark.parametrize("name", ["e1_tp2", "e1_tp2_scatter"])
def test_progressive_parts_bit_exact_on_every_tp_rank(name: str) -> None:
    emb, a, b = ranks_of(name, "progressive_parts")
    assert emb["final"] == "SUCCESS", emb
    assert a["bad"] == b["bad"] == [] and a["failed"] == b["failed"] == []
    assert a["ready"] == b["ready"] and a["ready"] == sorted(a["ready"]), (a["ready"], b["ready"])


def test_scatter_slice_failing_fails_the_room_on_every_rank() -> None:
    emb, a, b = ranks_of("e1_tp2_scatter", "scatter_embedding_abort")
    assert emb["final"] == "FAILED" and "the encoder crashed" in emb["failure"], emb
    assert [room for room, _ in a["failed"]] == [room for room, _ in b["failed"]]
    for x in (a, b):
        (_, why), = x["failed"]
        assert "the encoder crashed" in why or "failed on language rank" in why, why
    # rank 1's first chunk is what its first allocation held of the 100 tokens
    # (its size follows the rooms before, default_alloc_tokens="auto"), and a
    # resume round may carry the rest before the abort; nothing reached rank 2
    nb = token_nbytes("e1_tp2_scatter")
    assert 0 < a["received"] <= 100 * nb and a["received"] % nb == 0, (a, b)
    assert b["received"] == 0, b


def test_scatter_embedding_side_bytes_per_room() -> None:
    """The Embedding rank's per-room byte count: 1x the payload for a scatter
    instance, T x for a copy instance (ctx.stats()["bytes_per_room"]["sent"])."""
    res = ranks_of("e1_tp2_mixed", "traffic")
    nb = token_nbytes("e1_tp2_mixed")
    specs = traffic_specs("e1_tp2_mixed", 1 << 20)
    sent = res[0]["bytes_per_room"]["sent"]
    assert sent["count"] == len(specs)
    sizes = sorted([s.seq * nb * (1 if s.instance == 0 else 2) for s in specs])
    assert sent["max"] == sizes[-1]
    gathered = [res[r]["bytes_per_room"].get("gathered", {}).get("count", 0) for r in (1, 2)]
    assert gathered == [len([s for s in specs if s.instance == 0])] * 2
    assert "gathered" not in res[3]["bytes_per_room"] and "gathered" not in res[4]["bytes_per_room"]


def test_lockstep_rooms_added_in_different_order() -> None:
    _, a, b = ranks_of("e1_tp2", "lockstep_order")
    for x in (a, b):
        assert x["error_type"] == "LockstepError", x
        assert x["steps_ok"] == 0, x
        assert "TP ranks disagree" in x["error"], x["error"]
        assert x["elapsed"] < STALL_PEER_TIMEOUT_S, x  # detected by the exchange, not a timeout


def test_lockstep_rank_that_stops_stepping() -> None:
    _, a, b = ranks_of("e1_tp2", "lockstep_stall")
    stepper, idle = (a, b) if a["stepper"] else (b, a)
    assert idle["steps_ok"] == STALL_AFTER_STEPS
    assert stepper["error_type"] == "LockstepError", stepper
    assert stepper["steps_ok"] == STALL_AFTER_STEPS, stepper
    assert "step_timeout" in stepper["error"], stepper["error"]
    assert STALL_PEER_TIMEOUT_S - 0.5 <= stepper["elapsed"] <= STALL_PEER_TIMEOUT_S + \
        STALL_SLACK_S, stepper


def test_shutdown_after_lockstep_violation_is_bounded() -> None:
    ranks_of("e1_tp2", "lockstep_stall")  # (asserts every pool whole before shutdown)
    _, runs = _RUNS["e1_tp2"]
    times = [v["shutdown_s"] for v in runs]
    assert max(times) < SHUTDOWN_BOUND_S, times


def _check_claim(res: list[Any], room: int) -> None:
    emb, _, first, second = res
    assert second["init"] is True
    assert second["second_status"] == "FAILED", second
    assert "claimed by language instance" in (second["second_failure"] or ""), second
    assert first["first_status"] == "SUCCESS", (
        f"instance 0 claimed room {room} first, yet: {first['first_failure']}")
    assert first["bad"] == [], first["bad"]
    assert emb["sender_status"] == "SUCCESS", emb
    assert emb["delta"]["bytes_sent"] == first["delta"]["bytes_received"] > 0
    assert second["delta"]["bytes_received"] == 0


def test_room_claimed_by_two_instances_before_data() -> None:
    res = ranks_of("e2_2x1", "claim_before_data")
    assert res[2]["status_before_second_claim"] == "WAITING_FOR_INPUT"
    _check_claim(res, 7)


def test_room_claimed_by_two_instances_during_transfer() -> None:
    res = ranks_of("e2_2x1", "claim_during_transfer")
    assert res[2]["status_before_second_claim"] == "TRANSFERRING"
    assert res[2]["progress_before_second_claim"] == (2 * BS, 300)
    _check_claim(res, 8)
