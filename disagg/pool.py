"""Block pools.

`BlockAllocator` is the accounting both sides share: whole blocks, each owned by
one room, returned exactly once. `BlockPool` adds the Language side's landing
buffers ([num_blocks, block_size, *per_token_shape] on the pool's device).
The Embedding side uses a bare allocator as its budget: it never copies the
caller's tensors, it only bounds how many unfinished tokens it holds.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .errors import PoolFull
from .geometry import Geometry

FREE = -1


class BlockAllocator:
    """Thread-safe allocator of block ids [0, num_blocks) that prefers contiguous runs.

    Policy: the smallest free run that holds the whole request (lowest id on
    ties); otherwise the largest runs first. Deterministic, so freeing blocks
    and asking again for as many hands back the same ids.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self._owner = np.full(num_blocks, FREE, dtype=np.int64)
        self._num_free = num_blocks
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return self._num_free

    def _free_runs(self) -> tuple[np.ndarray, np.ndarray]:
        free = np.concatenate(([False], self._owner == FREE, [False]))
        edges = np.flatnonzero(np.diff(free.view(np.int8)))
        return edges[0::2], edges[1::2] - edges[0::2]  # starts, lengths

    def allocate(self, num_blocks: int, owner: int) -> list[int]:
        """Take `num_blocks` blocks for `owner`, or raise `PoolFull`."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        if owner < 0:
            raise ValueError(f"owner={owner} must be >= 0")
        with self._lock:
            if num_blocks > self._num_free:
                raise PoolFull(f"{num_blocks} blocks asked, {self._num_free} of "
                               f"{self.num_blocks} free")
            starts, lengths = self._free_runs()
            fits = np.flatnonzero(lengths >= num_blocks)
            if fits.size:
                best = fits[np.argmin(lengths[fits])]  # argmin: first (lowest id) on ties
                ids = list(range(int(starts[best]), int(starts[best]) + num_blocks))
            else:
                ids = []
                for i in np.argsort(-lengths, kind="stable"):
                    take = min(int(lengths[i]), num_blocks - len(ids))
                    ids.extend(range(int(starts[i]), int(starts[i]) + take))
                    if len(ids) == num_blocks:
                        break
            self._owner[ids] = owner
            self._num_free -= num_blocks
            return ids

    def try_allocate(self, num_blocks: int, owner: int) -> list[int] | None:
        try:
            return self.allocate(num_blocks, owner)
        except PoolFull:
            return None

    def free(self, block_ids: list[int], owner: int) -> None:
        """Return blocks. Out of range, duplicate, free or foreign ids raise
        `ValueError` and nothing is freed."""
        if not block_ids:
            return
        try:
            ids = np.asarray(block_ids, dtype=np.int64)
        except OverflowError:
            raise ValueError(f"block ids out of range [0, {self.num_blocks}): "
                             f"{block_ids}") from None
        with self._lock:
            if ids.min() < 0 or ids.max() >= self.num_blocks:
                raise ValueError(f"block ids out of range [0, {self.num_blocks}): {block_ids}")
            if np.unique(ids).size != ids.size:
                raise ValueError(f"duplicate block ids in free: {block_ids}")
            owners = self._owner[ids]
            if (owners == FREE).any():
                raise ValueError(f"double free of blocks {ids[owners == FREE].tolist()}")
            if (owners != owner).any():
                raise ValueError(f"blocks {ids[owners != owner].tolist()} are not owned "
                                 f"by {owner}")
            self._owner[ids] = FREE
            self._num_free += ids.size

    def owned_by(self, owner: int) -> list[int]:
        with self._lock:
            return np.flatnonzero(self._owner == owner).tolist()


class BlockPool:
    """Language-side pool: an allocator plus, when `with_buffers`, real
    per-token landing buffers on `device`."""

    def __init__(self, geometry: Geometry, device: torch.device, *, with_buffers: bool) -> None:
        self.geometry = geometry
        self.device = device
        self.allocator = BlockAllocator(geometry.num_blocks)
        self.buffers: dict[str, torch.Tensor] = {}
        if with_buffers:
            for b in geometry.buffers:
                self.buffers[b.name] = torch.empty(
                    (geometry.num_blocks, geometry.block_size, *b.per_token_shape),
                    dtype=b.dtype, device=device)

    def token_view(self, name: str, first_token: int, num_tokens: int) -> torch.Tensor:
        """Contiguous view of `num_tokens` pool tokens starting at flat token
        `first_token` (must lie within one run of blocks)."""
        flat = self.buffers[name].view(-1, *self.buffers[name].shape[2:])
        return flat[first_token:first_token + num_tokens]
