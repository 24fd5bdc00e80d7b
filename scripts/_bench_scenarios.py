"""The scenarios bench_transfer.py runs, by group. Pure data: no torch here."""

from __future__ import annotations

from dataclasses import dataclass

# Per-token bytes on the wire besides the embedding row: fill_ids int32 + mrope [3] int32.
INT_BYTES_PER_TOKEN = 4 + 12

GROUPS = ("sweep", "resume", "concurrency", "latency", "tp", "inflight", "memory")


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
    sizes = (256, 4096) if quick else (64, 256, 1024, 2000, 4096, 16384)
    out += [Scenario(f"sweep-{n}", "sweep", n) for n in sizes]
    chunk_counts = (1, 16) if quick else (1, 2, 4, 16)
    out += [_resume(c, 2000, pool_allocs=1) for c in chunk_counts]
    out += [_resume(c, 2000, pool_allocs=2) for c in chunk_counts if c > 2]
    out += [_resume(c, 2000) for c in chunk_counts]
    # the default: a first allocation a quarter of the room, auto_resume asks for
    # the rest as the first chunk's meta arrives
    out.append(Scenario("resume-output-auto", "resume", 2000, alloc=512))
    conc = ((8, 2000),) if quick else ((1, 2000), (8, 2000), (64, 256))
    out += [Scenario(f"conc-{k}x{n}", "concurrency", n, rooms=k) for k, n in conc]
    out.append(Scenario("latency-64tok", "latency", 64, rooms=8 if quick else 32,
                        sequential=True))
    # the usual serving order, the scheduler ahead of the encoder: what is left
    # is the data path (meta, payload, completion) without the ALLOC hop
    out.append(Scenario("latency-64tok-alloc-first", "latency", 64, rooms=8 if quick else 32,
                        sequential=True, alloc_first=True))
    out += [Scenario(f"tp{t}-2000", "tp", 2000, tp=t) for t in ((2,) if quick else (1, 2))]
    out += [Scenario(f"inflight-16x2000-tp{t}", "inflight", 2000, rooms=16, tp=t)
            for t in ((1,) if quick else (1, 2))]
    return out


def select(names: list[str], quick: bool) -> list[Scenario]:
    """Scenarios whose group or own name is in `names`, in run order."""
    return [s for s in scenarios(quick) if s.group in names or s.name in names]
