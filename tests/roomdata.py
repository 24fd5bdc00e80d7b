"""Room data for the real-process tests.

Every rank rebuilds a room's tensors from (room, seq) alone, so the Language
side can compare what arrived with what was sent without a second transfer.
Embeddings cover every bf16 bit pattern (NaNs, infs, -0.0, subnormals), which is
why comparisons go through int16 views: equality of bits, not of values.
"""

from __future__ import annotations

from typing import Any

import torch

import disagg


def random_bf16(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(-(1 << 15), 1 << 15, shape, dtype=torch.int16, generator=g).view(
        torch.bfloat16)


def random_i32(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(-(1 << 31), 1 << 31, shape, dtype=torch.int64, generator=g).to(
        torch.int32)


def room_data(room: int, seq: int, hidden: int, *, mrope: bool = True,
              extra_buffers: dict[str, Any] | None = None) -> dict[str, Any]:
    """embeddings [seq, hidden], fill_ids [seq], mrope_positions [3, seq] or None,
    extra {name: [seq, *shape]}: identical on every rank for the same arguments."""
    g = torch.Generator().manual_seed(room * 7919 + seq)
    return {
        "embeddings": random_bf16((seq, hidden), g),
        "fill_ids": random_i32((seq,), g),
        "mrope_positions": random_i32((3, seq), g) if mrope else None,
        "extra": {name: (random_bf16((seq, *shape), g) if dt == "bfloat16"
                         else random_i32((seq, *shape), g))
                  for name, (shape, dt) in (extra_buffers or {}).items()},
    }


def make_data(cfg: disagg.DisaggConfig, room: int, seq: int) -> dict[str, Any]:
    """`room_data` shaped by a config's geometry."""
    return room_data(room, seq, cfg.hidden_size, mrope=cfg.mrope,
                     extra_buffers=cfg.extra_buffers)


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Bit-exact equality, shape and dtype included."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.bfloat16, torch.float16):
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    return torch.equal(a, b)


def mismatches(res: Any, expected: dict[str, Any], aux: tuple[int, ...], room: int,
               seq: int) -> list[str]:
    """What in `res` differs from `expected` (a `room_data` dict) and `aux`; empty
    when the result is bit-exact."""
    if not isinstance(res, disagg.EmbeddingResult):
        return [f"room {room} (seq {seq}): result is {type(res).__name__}"]
    bad = [n for n in ("embeddings", "fill_ids", "mrope_positions")
           if not same(getattr(res, n), expected[n])]
    # plain row-major strides, as a fresh tensor has: .view(torch.uint8) etc. work
    bad += [f"{n} strides {t.stride()}" for n in ("embeddings", "fill_ids", "mrope_positions")
            if (t := getattr(res, n)) is not None
            and t.stride() != torch.empty(t.shape, device="meta").stride()]
    if set(res.extra) != set(expected["extra"]):
        bad.append(f"extra keys {sorted(res.extra)}")
    else:
        bad += [f"extra[{n}]" for n in expected["extra"]
                if not same(res.extra[n], expected["extra"][n])]
    if tuple(res.aux) != tuple(aux):
        bad.append(f"aux {tuple(res.aux)!r} != {tuple(aux)!r}")
    return [f"room {room} (seq {seq}): {b}" for b in bad]
