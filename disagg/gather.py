"""fanout="scatter": completing a room inside its Language instance.

Rank i of a TP-T instance received only tokens [i*c, min((i+1)*c, seq_len))
of the room, c = ceil(seq_len / T) (`plan.scatter_slice`), straight into
rows [i*c, (i+1)*c) of result tensors that have T*c rows. One all-gather per
buffer over the instance's own group (NCCL on GPU, so NVLink; Gloo on CPU)
then fills every other rank's rows in place: the input is a view of the
output, so no copy is made beyond what the collective itself does. Rows past
seq_len are padding that no rank received and no result shows.

Called from `RoomQueue.step()` only, for rooms that every rank of the
instance reported complete in the same step, in the queue's order: the
collectives are in lockstep by the same contract as the step's all-reduce.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from . import streams
from .errors import TransferTimeout
from .plan import scatter_stride
from .transport import FRAME_POLL_S, device_lock

# torch 2.13 renamed all_gather_into_tensor (same arguments); older torch has only that
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_slices(outputs: dict[str, torch.Tensor], seq_len: int, instance_size: int,
                  index: int, group: dist.ProcessGroup, timeout_s: float = 600.0) -> int:
    """All-gather every buffer's slices in place; return the bytes this rank
    received from the others (its own slice excluded, padding included).

    On CUDA the collectives are posted on the library stream (`streams.py`:
    the results were made there, and no stream of the application's is waited
    for) and host-observed by polling their works, as a pair's recvs are;
    `TransferTimeout` past `timeout_s`."""
    stride = scatter_stride(seq_len, instance_size)
    received = 0
    works: list[dist.Work] = []
    device = next(iter(outputs.values())).device
    cuda = device.type == "cuda"
    with streams.on_library_stream(device):
        for out in outputs.values():
            # as bytes: every backend gathers uint8, whatever the buffer's dtype
            rows = out.view(out.shape[0], -1).view(torch.uint8)  # contiguous (make_outputs)
            assert rows.shape[0] == stride * instance_size
            mine = rows[index * stride:(index + 1) * stride]
            # NCCL: one thread at a time issues to a device
            with device_lock(device) if cuda else contextlib.nullcontext():
                work = _all_gather(rows, mine, group=group, async_op=True)
            assert work is not None
            works.append(work)
            received += rows[0].nbytes * stride * (instance_size - 1)
    if not streams.observed(works, device, time.monotonic() + timeout_s, FRAME_POLL_S):
        raise TransferTimeout(f"scatter's all-gather on {device} not done after "
                              f"{timeout_s:.0f}s")
    for w in works:
        w.wait()  # Gloo: blocks; CUDA, once complete: only raises the work's error
    return received
