"""Room data for the in-process layer, and bit-exact comparison.

A room's tensors are rebuilt from (room, seq) alone. Embeddings are random
bit patterns (NaNs, infinities, -0.0 and subnormals included), so equality is
of bits: bf16 and fp16 are compared through int16 views with `torch.equal`.
Each room draws from its own seed, so a ghost of another room never compares
equal. Rooms are made on the CPU; `send` moves them to the sending engine's
device and `mismatches` compares on the result's, so every test runs as is
on a CUDA `World` (`scripts/gpu_check.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from roomdata import same  # tests/ is on sys.path for this package (pytest rootdir import)

from disagg.config import DisaggConfig
from disagg.embedding import Sender
from disagg.language import Receiver
from disagg.plan import scatter_slice
from disagg.types import EmbeddingResult, TransferStatus

if TYPE_CHECKING:
    from .fakes import World


@dataclass(frozen=True)
class RoomData:
    room: int
    seq: int
    embeddings: torch.Tensor  # [seq, hidden]
    fill_ids: torch.Tensor  # [seq] int32
    mrope_positions: torch.Tensor | None  # [3, seq] int32
    aux: tuple[int, ...]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def _bits(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Uniformly random bit patterns of `dtype`."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.randint(-(1 << 15), 1 << 15, shape, dtype=torch.int16,
                             generator=g).view(dtype)
    if dtype == torch.int32:
        return torch.randint(-(1 << 31), 1 << 31, shape, dtype=torch.int64,
                             generator=g).to(torch.int32)
    raise ValueError(f"no generator for {dtype}")


def aux_of(room: int) -> tuple[int, ...]:
    """Eight int64s: both extremes, negatives, and values unique to the room."""
    return (room % 97 - 50, -(1 << 63), (1 << 63) - 1, -1, 0, room, (1 << 40) + room,
            -(1 << 33) - room)


def room_data(cfg: DisaggConfig, room: int, seq: int) -> RoomData:
    g = torch.Generator().manual_seed(room * 7919 + seq)
    return RoomData(
        room=room, seq=seq,
        embeddings=_bits((seq, cfg.hidden_size), cfg.torch_dtype, g),
        fill_ids=_bits((seq,), torch.int32, g),
        mrope_positions=_bits((3, seq), torch.int32, g) if cfg.mrope else None,
        aux=aux_of(room),
        extra={name: _bits((seq, *shape), getattr(torch, dt), g)  # dtype names are torch's
               for name, (shape, dt) in sorted(cfg.extra_buffers.items())})


def on(data: RoomData, device: torch.device) -> RoomData:
    """The same room with its tensors on `device` (itself when already there)."""
    if data.embeddings.device == device:
        return data
    return dataclasses.replace(
        data, embeddings=data.embeddings.to(device), fill_ids=data.fill_ids.to(device),
        mrope_positions=(None if data.mrope_positions is None
                         else data.mrope_positions.to(device)),
        extra={n: t.to(device) for n, t in data.extra.items()})


def send(sender: Sender, data: RoomData) -> None:
    data = on(data, sender._engine.device)  # the caller's tensors live where the engine works
    sender.send(data.embeddings, data.fill_ids, data.mrope_positions, aux=data.aux,
                **data.extra)


def mismatches(res: EmbeddingResult, data: RoomData) -> list[str]:
    """What in `res` differs, bit for bit, from what was sent; empty when exact."""
    data = on(data, res.embeddings.device)
    bad = [name for name in ("embeddings", "fill_ids", "mrope_positions")
           if not same(getattr(res, name), getattr(data, name))]
    # plain row-major strides, as a fresh tensor has
    bad += [f"{name} strides {t.stride()}" for name in ("embeddings", "fill_ids",
                                                         "mrope_positions")
            if (t := getattr(res, name)) is not None
            and t.stride() != torch.empty(t.shape, device="meta").stride()]
    if set(res.extra) != set(data.extra):
        bad.append(f"extra keys {sorted(res.extra)} != {sorted(data.extra)}")
    else:
        bad += [f"extra[{n}]" for n in data.extra if not same(res.extra[n], data.extra[n])]
    if tuple(res.aux) != data.aux:
        bad.append(f"aux {tuple(res.aux)!r} != {data.aux!r}")
    return [f"room {data.room} (seq {data.seq}): {b}" for b in bad]


# ------------------------------------------------------------ whole rooms through a World


def receive(w: World, room: int, seq: int, lang: int | None = None) -> tuple[Receiver, RoomData]:
    """One room from Embedding rank 0, sender first, received whole on one
    Language rank (resuming as needed): SUCCESS on both sides."""
    d = room_data(w.cfg, room, seq)
    s = w.emb().sender(room)
    send(s, d)
    r = w.lang(lang).receiver(room, src_rank=0)
    assert r.init()
    assert w.finish(r, f"room {room}") is TransferStatus.SUCCESS, r.failure
    assert w.ended(s, f"sender {room}") is TransferStatus.SUCCESS, s.failure
    return r, d


def receivers_of(w: World, room: int) -> list[Receiver]:
    """A receiver of `room` (from Embedding rank 0) on every Language rank."""
    return [w.lang(rank).receiver(room, src_rank=0) for rank in w.topology.language_ranks]


def receive_everywhere(w: World, room: int, seq: int) -> tuple[list[Receiver], RoomData]:
    """One room from Embedding rank 0, sender first, to every Language rank of
    the World's one instance (each resuming as needed): SUCCESS everywhere."""
    d = room_data(w.cfg, room, seq)
    s = w.emb().sender(room)
    send(s, d)
    rs = receivers_of(w, room)
    for r in rs:
        assert r.init()
    for r in rs:
        assert w.finish(r, f"room {room} (seq {seq})") is TransferStatus.SUCCESS, r.failure
    assert w.ended(s, "sender") is TransferStatus.SUCCESS
    return rs, d


def gather_by_hand(receivers: list[Receiver]) -> None:
    """fanout="scatter": what the instance's all-gather does, rank j's slice
    rows into every other rank's outputs; then each receiver is marked gathered."""
    outs = [r._r.outputs for r in receivers]
    seq = receivers[0].progress[1]
    assert seq is not None and all(o is not None for o in outs)
    for j, src in enumerate(outs):
        lo, hi = scatter_slice(seq, len(receivers), j)
        for dst in outs:
            if dst is not src:
                for name, t in src.items():  # type: ignore[union-attr]
                    dst[name][lo:hi] = t[lo:hi]  # type: ignore[index]
    for r in receivers:
        r.gather(None)
