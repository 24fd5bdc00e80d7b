"""The scenarios bench_transfer.py runs, by group. Pure data: no torch here."""

from __future__ import annotations

from dataclasses import dataclass

# Per-token bytes on the wire besides the embedding row: fill_ids int32 + mrope [3] int32.
INT_BYTES_PER_TOKEN = 4 + 12

GROUPS = ("sweep", "resume", "concurrency", "latency", "tp", "inflight", "memory")

# How disagg's callers wait for a room (both sides): blocked in wait(), spinning
# on poll(), or a serving loop with SERVING_WORK_S of pure Python between polls.
CALLERS = ("wait", "spin", "serving")
SERVING_WORK_S = 0.002
# raw and zmq block; rawloop is raw driven by the serving loop (SERVING_WORK_S of
# Python between looks at the works): the floor for disagg's serving caller.
# All land in preallocated (or fresh) tensors.
BASELINES = ("raw", "zmq", "rawloop")
KNOWN_LEN = "+len"  # mode suffix: the receiver passes seq_len= to init(), ALLOC carries it
MEMORY_TARGET_PCT = 5.0


@dataclass(frozen=True)
class Scenario:
    """One thing to measure. A round moves `rooms` rooms of `tokens` tokens from
    the Embedding rank (rank 0) to every Language rank (ranks 1..tp)."""

    name: str
    group: str
    tokens: int
    hidden: int = 3584
    block: int = 128
    rooms: int = 1  # rooms per round
    sequential: bool = False  # one room at a time (else all started together)
    tp: int = 1  # Language TP ranks; the world is 1 + tp ranks
    recv_into: str = "output"
    alloc: int | None = None  # first allocation (tokens); None: the whole room
    pool_allocs: int = 0  # Language pool of this many first allocations (0: roomy)
    manual_resume: bool = False  # auto_resume=False; resume(num_tokens=alloc) each round
    alloc_first: bool = False  # Language sends its ALLOCs before the round starts
    memory_checkpoints: tuple[int, ...] = ()  # memory scenario: RSS after this many rooms
    known_len: bool = False  # also run every caller with seq_len= known (mode "<caller>+len")

    @property
    def world(self) -> int:
        return 1 + self.tp

    @property
    def alloc_tokens(self) -> int:
        return self.alloc or -(-self.tokens // self.block) * self.block

    @property
    def room_bytes(self) -> int:
        return self.tokens * (self.hidden * 2 + INT_BYTES_PER_TOKEN)

    @property
    def round_bytes(self) -> int:
        """Bytes delivered per round: every room to every Language rank."""
        return self.room_bytes * self.rooms * self.tp

    @property
    def expected_chunks(self) -> int:
        if self.manual_resume or self.pool_allocs:
            return -(-self.tokens // self.alloc_tokens)
        return 1 if self.alloc_tokens >= self.tokens else 2  # auto_resume: the rest at once

    @property
    def is_memory(self) -> bool:
        return bool(self.memory_checkpoints)

    def modes(self, callers: tuple[str, ...], known_len: bool = True) -> list[str]:
        """disagg's modes in this scenario: each caller, then each caller with the
        length known where the scenario has that variant. The memory scenario
        runs the first caller only."""
        if self.is_memory:
            return list(callers[:1])
        return [*callers, *(c + KNOWN_LEN for c in callers if known_len and self.known_len)]


def parse_mode(mode: str) -> tuple[str, bool]:
    """(caller, seq_len known) of a mode name such as "spin" or "wait+len"."""
    return mode.removesuffix(KNOWN_LEN), mode.endswith(KNOWN_LEN)


def _resume(chunks: int, tokens: int, *, pool_allocs: int = 0) -> Scenario:
    """A room in `chunks` chunks. Output mode: the loop resumes by hand, one
    allocation's worth a round. Pool mode: a pool of `pool_allocs` allocations
    and auto_resume (1: each chunk waits for the last one's blocks; 2: double
    buffering, the next RESUME leaves while a chunk lands)."""
    blocks = -(-tokens // 128) // chunks
    if not pool_allocs:
        return Scenario(f"resume-output-{chunks}ch", "resume", tokens, alloc=blocks * 128,
                        manual_resume=True)
    name = "pool" if pool_allocs == 1 else f"pool{pool_allocs}x"
    return Scenario(f"resume-{name}-{chunks}ch", "resume", tokens, alloc=blocks * 128,
                    recv_into="pool", pool_allocs=pool_allocs)


def scenarios(quick: bool) -> list[Scenario]:
    """Every scenario, in run order. `quick`: fewer sizes, smaller counts."""
    # memory first: its RSS baseline is then not inflated by the other scenarios' tensors
    out = [Scenario("memory-16tok", "memory", 16, hidden=64, block=16,
                    memory_checkpoints=(200, 2000) if quick else (1000, 10000))]
    sizes = (256, 2000) if quick else (64, 256, 1024, 2000, 4096, 16384)
    # 2000 tokens is the 14 MiB room of the targets: also with its length known
    out += [Scenario(f"sweep-{n}", "sweep", n, known_len=n == 2000) for n in sizes]
    # 4 chunks through a pool of 2 allocations: 8 blocks of 128 tokens, auto_resume
    chunk_counts = (1, 4) if quick else (1, 2, 4, 16)
    out += [_resume(c, 2000, pool_allocs=1) for c in chunk_counts]
    out += [_resume(c, 2000, pool_allocs=2) for c in chunk_counts if c > 2]
    out += [_resume(c, 2000) for c in chunk_counts]
    # the default: a first allocation a quarter of the room, auto_resume asks for
    # the rest as the first chunk's meta arrives
    out.append(Scenario("resume-output-auto", "resume", 2000, alloc=512))
    conc = ((64, 256),) if quick else ((1, 2000), (8, 2000), (64, 256))
    out += [Scenario(f"conc-{k}x{n}", "concurrency", n, rooms=k) for k, n in conc]
    out.append(Scenario("latency-64tok", "latency", 64, rooms=8 if quick else 32,
                        sequential=True, known_len=True))
    # the usual serving order, the scheduler ahead of the encoder: what is left
    # is the data path (meta, payload, completion) without the ALLOC hop
    out.append(Scenario("latency-64tok-alloc-first", "latency", 64, rooms=8 if quick else 32,
                        sequential=True, alloc_first=True))
    out += [Scenario(f"tp{t}-2000", "tp", 2000, tp=t) for t in ((2,) if quick else (1, 2))]
    out += [Scenario(f"inflight-16x2000-tp{t}", "inflight", 2000, rooms=16, tp=t)
            for t in ((1,) if quick else (1, 2))]
    return out


TARGETS_SET = "targets"  # --scenarios targets: the scenarios TARGETS name, nothing else


def select(names: list[str], quick: bool) -> list[Scenario]:
    """Scenarios whose group or own name is in `names` ("targets": every
    scenario a target names), in run order."""
    wanted = set(names)
    if TARGETS_SET in wanted:
        wanted |= {t.scenario for t in TARGETS if t.scenario}
    return [s for s in scenarios(quick) if s.group in wanted or s.name in wanted]


@dataclass(frozen=True)
class Target:
    """One figure the benchmark reports against a bar. `kind`: "spin_loss"
    (spin vs wait in every scenario, % of throughput lost), "ratio" (`modes` of
    `scenario` against baseline `base`), "serving_p50" (the serving caller's p50
    room latency, `modes[0]`, minus the waiting caller's of the same variant, in
    ms and in loop iterations; also minus rawloop's, what the loop costs raw) or
    "memory" (RSS growth, %). `bar`: the issue's limit (spin_loss and memory: at
    most; ratio: at least); None where the issue names the figure but no limit,
    which the summary then reports without a verdict."""

    key: str
    text: str
    kind: str
    scenario: str | None = None
    modes: tuple[str, ...] = CALLERS
    base: str = "raw"
    bar: float | None = None

    @property
    def judged(self) -> tuple[str, ...]:
        """The modes a ratio bar applies to: the blocking and the spinning caller
        (the serving loop has its own latency target)."""
        return tuple(m for m in self.modes if parse_mode(m)[0] in ("wait", "spin"))


_LEN = tuple(c + KNOWN_LEN for c in CALLERS)
_SERVING = ("serving",)
TARGETS = (
    Target("spin-loss", "spinning callers lose at most 15 % vs blocking, every scenario",
           "spin_loss", bar=15.0),
    Target("14mib-1ch", "14 MiB, one chunk (>= 0.85)", "ratio", "sweep-2000", bar=0.85),
    Target("14mib-1ch-len", "14 MiB, one chunk, seq_len known", "ratio", "sweep-2000", _LEN),
    Target("14mib-16", "14 MiB, 16 rooms in flight (>= 0.90)", "ratio", "inflight-16x2000-tp1",
           bar=0.90),
    Target("64tok", "64-token rooms one at a time, ALLOC in the path (>= 0.60)", "ratio",
           "latency-64tok", bar=0.60),
    Target("64tok-len", "64-token rooms one at a time, seq_len known (>= 0.80)", "ratio",
           "latency-64tok", _LEN, bar=0.80),
    Target("64x1.75", "64 rooms of 1.75 MiB in flight (>= 0.80)", "ratio", "conc-64x256",
           bar=0.80),
    Target("64x1.75-zmq", "64 rooms of 1.75 MiB in flight, vs ZeroMQ + copy (>= 0.95)",
           "ratio", "conc-64x256", base="zmq", bar=0.95),
    Target("64x1.75-serving", "64 rooms of 1.75 MiB in flight, serving loops (>= 0.75)",
           "ratio", "conc-64x256", _SERVING, bar=0.75),
    Target("pool-8x128", "14 MiB through a pool of 8 blocks of 128 tokens, 4 chunks (>= 0.75)",
           "ratio", "resume-pool2x-4ch", bar=0.75),
    Target("serving-14mib", "serving loops: 14 MiB room p50 at most 1.25 iterations over wait's",
           "serving_p50", "sweep-2000", _SERVING, bar=1.25),
    Target("serving-14mib-len", "the same, seq_len known", "serving_p50", "sweep-2000",
           ("serving" + KNOWN_LEN,)),
    Target("serving-64tok", "serving loops: 64-token room p50 at most 1.25 iterations over wait's",
           "serving_p50", "latency-64tok", _SERVING, bar=1.25),
    Target("serving-64tok-len", "the same, seq_len known", "serving_p50", "latency-64tok",
           ("serving" + KNOWN_LEN,)),
    Target("rss", f"resident memory over many rooms (at most {MEMORY_TARGET_PCT:g} % growth)",
           "memory", "memory-16tok", bar=MEMORY_TARGET_PCT),
)
