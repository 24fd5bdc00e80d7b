"""Pure planning: block arithmetic, segment plans, chunk sizes.

Integers in, integers out, no I/O: both ends of a pair call the same functions
on the same inputs (the destination block list, n_tokens) and so post sends and
recvs that match one for one, in order and in size. Property tests hammer these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class Segment(NamedTuple):
    """`num_tokens` tokens at `chunk_start` within the chunk, landing at token
    `dst_token` of the destination (the pool's flat token space, or the
    room's output when the plan is direct)."""

    chunk_start: int
    num_tokens: int
    dst_token: int


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Whole blocks needed to hold `num_tokens` (ceil)."""
    if num_tokens < 0 or block_size < 1:
        raise ValueError(f"num_tokens={num_tokens}, block_size={block_size}")
    return -(-num_tokens // block_size)


def runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive ids, in list order: [(first_id, length), ...]."""
    out: list[tuple[int, int]] = []
    for b in block_ids:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def segment_plan(block_ids: Sequence[int], block_size: int, num_tokens: int,
                 *, direct: bool = False, dst_offset: int = 0) -> list[Segment]:
    """How `num_tokens` chunk tokens map onto the destination.

    Token i of the chunk goes to block `block_ids[i // block_size]`. One segment
    per contiguous run of blocks, the last one cut at `num_tokens`. A direct plan
    is a single segment landing at `dst_offset` of the output.
    """
    capacity = len(block_ids) * block_size
    if num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens} must be >= 1")
    if direct:
        return [Segment(0, num_tokens, dst_offset)]
    if num_tokens > capacity:
        raise ValueError(f"num_tokens={num_tokens} exceeds {len(block_ids)} blocks "
                         f"x {block_size} = {capacity} tokens")
    plan: list[Segment] = []
    start = 0
    for first, length in runs(block_ids):
        if start >= num_tokens:
            break
        n = min(length * block_size, num_tokens - start)
        plan.append(Segment(start, n, first * block_size))
        start += n
    return plan


def chunk_tokens(seq_len: int, sent_tokens: int, allocated_tokens: int) -> int:
    """Tokens the next chunk carries: min(remaining, allocated)."""
    if not 0 <= sent_tokens < seq_len or allocated_tokens < 1:
        raise ValueError(f"seq_len={seq_len}, sent_tokens={sent_tokens}, "
                         f"allocated_tokens={allocated_tokens}")
    return min(seq_len - sent_tokens, allocated_tokens)


def alloc_blocks_for(request: int, block_size: int, remaining: int | None,
                     max_blocks: int) -> int:
    """Blocks to take for a request of `request` tokens: whole blocks, never
    more than the rest of the room needs (when known) nor the whole pool."""
    want = request if remaining is None else min(request, remaining)
    return max(1, min(num_blocks_for(want, block_size), max_blocks))


def scatter_stride(seq_len: int, instance_size: int) -> int:
    """Tokens of each rank's slice with fanout="scatter": ceil(seq_len / T).
    The slices, the result's rows (T x stride) and the all-gather all use it."""
    return -(-seq_len // instance_size)


def scatter_slice(seq_len: int, instance_size: int, index: int) -> tuple[int, int]:
    """Tokens [lo, hi) of a `seq_len`-token room that rank `index` of a TP
    instance of `instance_size` receives with fanout="scatter": contiguous
    slices of ceil(seq_len / instance_size) tokens, the last ones shorter or
    empty (seq_len 1 with TP 4: rank 0 gets the token, ranks 1-3 nothing).
    Both ends derive it from these three numbers alone, and the all-gather
    that completes the room reads slices of exactly that stride."""
    if seq_len < 0 or instance_size < 1 or not 0 <= index < instance_size:
        raise ValueError(f"seq_len={seq_len}, instance_size={instance_size}, index={index}")
    stride = scatter_stride(seq_len, instance_size)
    lo = min(index * stride, seq_len)
    return lo, min(lo + stride, seq_len)


def span(seq_len: int, instance_size: int, index: int | None) -> tuple[int, int]:
    """Tokens [lo, hi) of a room that one Language rank receives: all of it
    (`index` None: fanout="copy"), or its `scatter_slice`. Both ends use it."""
    if index is None:
        return 0, seq_len
    return scatter_slice(seq_len, instance_size, index)


def prepost_tokens(span_tokens: int, key: int, allocated_tokens: int) -> int:
    """Tokens of the chunk that answers a pre-posted allocation (wire
    FLAG_PREPOSTED): all that fits of what is left of the rank's span after
    `key` tokens, min(span_tokens - key, allocated); 0 for an empty span. Both
    ends size that frame's recvs and sends from it, so it is exact."""
    if not 0 <= key <= span_tokens or allocated_tokens < 1:
        raise ValueError(f"span_tokens={span_tokens}, key={key}, "
                         f"allocated_tokens={allocated_tokens}")
    return min(span_tokens - key, allocated_tokens)
