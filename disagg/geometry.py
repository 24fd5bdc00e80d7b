"""Pool geometry: the per-token buffers every rank must agree on.

Geometry is published in the c10d store as JSON (never pickle) and compared at
start-up, so a mismatch is an error naming both sides instead of a garbled
transfer later.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from .config import DTYPES, DisaggConfig
from .errors import GeometryMismatch
from .topology import Topology

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# fill_ids and mrope_positions travel side by side as one [seq, 4] int32 buffer
PACKED_IDS = "fill_ids+mrope_positions"

__all__ = ["PACKED_IDS", "BufferSpec", "Geometry", "Topology"]  # Topology: its old home


@dataclass(frozen=True)
class BufferSpec:
    name: str
    per_token_shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def token_numel(self) -> int:
        return math.prod(self.per_token_shape)

    @property
    def token_nbytes(self) -> int:
        return self.token_numel * self.dtype.itemsize


@dataclass(frozen=True)
class Geometry:
    block_size: int
    num_blocks: int
    buffers: tuple[BufferSpec, ...]

    @classmethod
    def from_config(cls, cfg: DisaggConfig) -> Geometry:
        bufs = [BufferSpec("embeddings", (cfg.hidden_size,), cfg.torch_dtype),
                BufferSpec("fill_ids", (), torch.int32)]
        if cfg.mrope:
            bufs.append(BufferSpec("mrope_positions", (3,), torch.int32))
        for name, (shape, dt) in sorted(cfg.extra_buffers.items()):
            bufs.append(BufferSpec(name, tuple(shape), DTYPES[dt]))
        return cls(cfg.block_size, cfg.num_blocks, tuple(bufs))

    @property
    def token_nbytes(self) -> int:
        return sum(b.token_nbytes for b in self.buffers)

    @functools.cached_property
    def wire_buffers(self) -> tuple[BufferSpec, ...]:
        """What travels, one op per segment each, and what the Language pool and
        results hold: the buffers above, except that with M-RoPE the 4 bytes of
        fill_ids and 12 of positions per token are packed into one [seq, 4]
        int32 buffer (`PACKED_IDS`), so a chunk needs one op fewer. Positions are
        transposed to token-major for the wire anyway, so packing adds no copy."""
        names = [b.name for b in self.buffers]
        if "mrope_positions" not in names:
            return self.buffers
        ids = BufferSpec(PACKED_IDS, (4,), torch.int32)
        return tuple(ids if b.name == "fill_ids" else b for b in self.buffers
                     if b.name != "mrope_positions")

    @property
    def extra_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.buffers[2:] if b.name != "mrope_positions")

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-able form, published in the c10d store (never pickle)."""
        return {"block_size": self.block_size, "num_blocks": self.num_blocks,
                "buffers": [[b.name, list(b.per_token_shape), _DTYPE_NAMES[b.dtype]]
                            for b in self.buffers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        return cls(int(d["block_size"]), int(d["num_blocks"]),
                   tuple(BufferSpec(n, tuple(s), DTYPES[t]) for n, s, t in d["buffers"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Geometry:
        return cls.from_dict(json.loads(text))

    def check_compatible(self, other: Geometry, *, rank: int, peer: int) -> None:
        """Raise `GeometryMismatch` naming both sides' values. `num_blocks` may differ."""

        def describe(g: Geometry) -> str:
            return ", ".join(f"{b.name}{list(b.per_token_shape)}:{_DTYPE_NAMES[b.dtype]}"
                             for b in g.buffers)

        if self.block_size != other.block_size:
            raise GeometryMismatch(
                f"block_size differs: rank {rank} has {self.block_size}, "
                f"rank {peer} has {other.block_size}", rank=rank, peer=peer)
        if self.buffers != other.buffers:
            raise GeometryMismatch(
                f"pool buffers differ: rank {rank} has [{describe(self)}], "
                f"rank {peer} has [{describe(other)}]", rank=rank, peer=peer)
