"""Public value types: transfer status and the received result."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


def check_room_id(room: object) -> None:
    """Room ids are ints in [0, 2**63), the same rule on both sides."""
    if isinstance(room, bool) or not isinstance(room, int) or not 0 <= room < (1 << 63):
        raise ValueError(f"room={room!r} must be an int in [0, 2**63)")


class TransferStatus(enum.IntEnum):
    """Ordered so that an all-reduce MIN gives the least advanced state and FAILED wins."""

    FAILED = 0
    BOOTSTRAPPING = 1
    WAITING_FOR_INPUT = 2
    TRANSFERRING = 3
    SUCCESS = 4


TERMINAL = (TransferStatus.SUCCESS, TransferStatus.FAILED)


def advance(room: int, current: TransferStatus, new: TransferStatus,
            failure: str | None) -> TransferStatus:
    """The DESIGN order, for both sides' rooms: progress is monotone, SUCCESS and
    FAILED are final, and FAILED comes only with a failure. Returns `new`;
    anything else is a bug of the caller's machine (AssertionError)."""
    if current in TERMINAL:
        raise AssertionError(f"room {room}: {current.name} -> {new.name}")
    if new is TransferStatus.FAILED:
        assert failure is not None, f"room {room}: FAILED without a failure"
    elif new < current:
        raise AssertionError(f"room {room}: {current.name} -> {new.name}")
    return new


@dataclass(frozen=True)
class EmbeddingResult:
    """One room's data as it arrived on a Language rank.

    embeddings [seq, hidden]; fill_ids [seq]; mrope_positions [3, seq] or None;
    aux: the ints the sender attached; extra: name -> [seq, *per_token_shape].
    """

    embeddings: torch.Tensor
    fill_ids: torch.Tensor
    mrope_positions: torch.Tensor | None
    aux: tuple[int, ...] = ()
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
