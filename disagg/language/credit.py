"""Language side: the only code that takes or frees Language blocks, and the
"auto" first-allocation policy.

A `Credit` is what one ALLOC or RESUME announced to the Embedding rank: block
ids (landing space in pool mode, flow-control credit otherwise) or, for a
"direct" resume, only a token count. It stays with its room until a frame on
the pair's stream answers it (the chunk landed, or an ABORT frame came), and
is then released exactly once.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..plan import alloc_blocks_for, num_blocks_for
from ..pool import BlockPool
from ..stats import Stats

AUTO_COLD_START = 8192  # "auto" first allocation until it has seen enough lengths
AUTO_WINDOW = 256  # recent lengths that "auto" first allocation learns from
AUTO_QUANTILE = 90
AUTO_MIN_SAMPLES = 8


@dataclass
class Credit:
    """Blocks (or direct credit) announced to the Embedding rank, by `key` =
    tokens landed before it."""

    key: int
    block_ids: list[int]
    allocated_tokens: int
    direct: bool
    posted: bool = False  # its answer's recvs are posted (pre-posted): only the pair's thread frees it


class Credits:
    def __init__(self, pool: BlockPool, stats: Stats, *, direct: bool,
                 default_alloc_tokens: int | Literal["auto"]) -> None:
        self.pool = pool
        self.allocator = pool.allocator
        self.block_size = pool.geometry.block_size
        self.direct = direct  # recv_into="output": every chunk lands in the room's output
        self._stats = stats
        self._default = default_alloc_tokens
        self._lock = threading.Lock()  # the window is read from callers' threads
        self._recent_lengths: collections.deque[int] = collections.deque(maxlen=AUTO_WINDOW)

    def take(self, room: int, want: int, *, key: int, remaining: int | None, resume: bool,
             at_least: int = 1, reserve: int = 0) -> Credit | None:
        """Take blocks (or direct credit) for `want` tokens.

        When the pool is short the allocation is partial (at least `at_least`
        blocks, or all of them if fewer are wanted), so a room never waits for
        more blocks than may ever be free at once. A new room (ALLOC) leaves
        `reserve` blocks, one for each room waiting to resume: those hold the
        Embedding side's data and budget, so they must be able to move or the
        two sides could wait on each other for good. None: no blocks now.
        """
        bs = self.block_size
        num = alloc_blocks_for(want, bs, remaining, self.allocator.num_blocks)
        if resume and self.direct:
            ids: list[int] = []  # output mode asks for the rest at once: no credit needed
        else:
            free = self.allocator.num_free - (0 if resume else reserve)
            if free < min(num, at_least):
                return None
            num = min(num, free)
            if num < 1:
                return None
            ids = self.allocator.allocate(num, owner=room)
            self._stats.set_gauge("pool_free_blocks", self.allocator.num_free)
        # A resume knows seq_len and the output exists, so it lands there in both
        # modes; in pool mode its blocks are only credit that bounds what is in flight.
        return Credit(key, ids, num * bs, self.direct or resume)

    def release(self, room: int, credit: Credit) -> None:
        if credit.block_ids:
            self.allocator.free(credit.block_ids, owner=room)
            self._stats.set_gauge("pool_free_blocks", self.allocator.num_free)

    # ------------------------------------------------------------ "auto" first allocation

    def first_alloc_tokens(self) -> int:
        """The first allocation of a room when the caller names none."""
        if self._default != "auto":
            assert isinstance(self._default, int)
            return self._default
        with self._lock:
            lengths = list(self._recent_lengths)
        if len(lengths) < AUTO_MIN_SAMPLES:
            return self.cold_start()
        return max(1, min(int(np.percentile(lengths, AUTO_QUANTILE)), self._fair_share()))

    def learn(self, seq_len: int) -> None:
        with self._lock:
            self._recent_lengths.append(seq_len)

    def _fair_share(self) -> int:
        """Tokens one room's "auto" first allocation may take: a quarter of the pool."""
        return max(1, self.allocator.num_blocks // 4) * self.block_size

    def cold_start(self) -> int:
        return min(AUTO_COLD_START, self._fair_share())

    def account_auto(self, first_blocks: int | None, seq_len: int) -> None:
        """For "auto" first allocations: resume rounds saved against always taking
        the cold-start value (negative: rounds it spent to save memory) and blocks
        beyond what the room needed."""
        if first_blocks is None:
            return
        bs = self.block_size
        fixed = num_blocks_for(self.cold_start(), bs) * bs
        self._stats.add(
            auto_alloc_resumes_avoided=int(seq_len > fixed) - int(seq_len > first_blocks * bs),
            auto_alloc_overallocated_blocks=max(0, first_blocks - num_blocks_for(seq_len, bs)))
