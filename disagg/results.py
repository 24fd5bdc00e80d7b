"""A Language room's result tensors: where they are made, the one copy
`result()` makes (splitting the packed ids), and the views `prefix()` gives
of what has landed. With the receive streams' copy out of the pool
(`language/stream.py`), these are every copy the library makes of received
bytes."""

from __future__ import annotations

import dataclasses

import torch

from . import streams
from .geometry import PACKED_IDS, Geometry
from .pages import empty_result
from .types import EmbeddingResult, TransferStatus


def make_outputs(geometry: Geometry, rows: int,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """One [rows, *per_token] tensor per wire buffer, where chunks land: made on
    the library stream, whichever thread asks (`streams.py`)."""
    with streams.on_library_stream(device):
        return {b.name: empty_result((rows, *b.per_token_shape), b.dtype, device)
                for b in geometry.wire_buffers}


def to_result(geometry: Geometry, outputs: dict[str, torch.Tensor],
              aux: tuple[int, ...], seq: int) -> EmbeddingResult:
    """The whole room, its first `seq` rows of the outputs (with
    fanout="scatter" the outputs have padding rows after), but `fill_ids` and
    `mrope_positions` split out of the packed ids into tensors of their own."""
    views = prefix_views(geometry, outputs, seq, aux, outputs["embeddings"].device)
    if PACKED_IDS not in outputs:
        return views
    # clone, not contiguous(): a 1-token column counts as contiguous with stride 4
    own = torch.contiguous_format
    assert views.mrope_positions is not None
    return dataclasses.replace(views, fill_ids=views.fill_ids.clone(memory_format=own),
                               mrope_positions=views.mrope_positions.clone(memory_format=own))


def prefix_views(geometry: Geometry, outputs: dict[str, torch.Tensor] | None, num_tokens: int,
                 aux: tuple[int, ...], device: torch.device) -> EmbeddingResult:
    """Views (no copy) of the first `num_tokens` tokens of a room's outputs;
    zero-length tensors before its first chunk landed. `fill_ids` and
    `mrope_positions` are strided views into the packed ids. Called on the
    caller's thread: its current stream is the one that will read them
    (`streams.hand_over`)."""
    if outputs is not None:
        streams.hand_over(outputs.values())
    else:
        outputs = {b.name: torch.empty((0, *b.per_token_shape), dtype=b.dtype, device=device)
                   for b in geometry.wire_buffers}
        num_tokens = 0
    packed = outputs.get(PACKED_IDS)
    return EmbeddingResult(
        embeddings=outputs["embeddings"][:num_tokens],
        fill_ids=(outputs["fill_ids"][:num_tokens] if packed is None
                  else packed[:num_tokens, 0]),
        mrope_positions=None if packed is None else packed[:num_tokens, 1:].t(),
        aux=aux, extra={n: outputs[n][:num_tokens] for n in geometry.extra_names})


def no_result(room: int, status: TransferStatus, failure: str | None, handed_back: bool,
              ungathered: bool) -> str | None:
    """Why `result()` of a room cannot be given now, or None (a room, a room
    declared as items: the same rules)."""
    if status != TransferStatus.SUCCESS:
        return (f"room {room} has no result: status {status.name}"
                + (f" ({failure})" if failure else ""))
    if handed_back:
        return (f"room {room}'s result was handed back (recycle()): its memory holds later "
                f"rooms now")
    if ungathered:
        return (f"room {room} has only this rank's slice: with fanout='scatter' its result "
                f"comes from queue().step(), which all-gathers it")
    return None
