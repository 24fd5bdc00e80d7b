"""A Language room's result tensors: where they are made, and the one copy
`result()` makes (splitting the packed ids). With the receive streams' copy
out of the pool (`language/stream.py`), these are every copy the library
makes of received bytes."""

from __future__ import annotations

import torch

from .geometry import PACKED_IDS, Geometry
from .pages import empty_result
from .types import EmbeddingResult


def make_outputs(geometry: Geometry, seq_len: int,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """One [seq_len, *per_token] tensor per wire buffer, where chunks land."""
    return {b.name: empty_result((seq_len, *b.per_token_shape), b.dtype, device)
            for b in geometry.wire_buffers}


def to_result(geometry: Geometry, outputs: dict[str, torch.Tensor],
              aux: tuple[int, ...]) -> EmbeddingResult:
    packed = outputs.get(PACKED_IDS)  # [seq, 4]: fill_ids, then the 3 positions
    # clone, not contiguous(): a 1-token column counts as contiguous with stride 4
    own = torch.contiguous_format
    return EmbeddingResult(
        embeddings=outputs["embeddings"],
        fill_ids=(outputs["fill_ids"] if packed is None
                  else packed[:, 0].clone(memory_format=own)),
        mrope_positions=None if packed is None else packed[:, 1:].t().clone(memory_format=own),
        aux=aux, extra={n: outputs[n] for n in geometry.extra_names})
