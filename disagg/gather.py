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

import torch
import torch.distributed as dist

from .plan import scatter_stride
from .transport import device_lock

# torch 2.13 renamed all_gather_into_tensor (same arguments); older torch has only that
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_slices(outputs: dict[str, torch.Tensor], seq_len: int, instance_size: int,
                  index: int, group: dist.ProcessGroup) -> int:
    """All-gather every buffer's slices in place; return the bytes this rank
    received from the others (its own slice excluded, padding included)."""
    stride = scatter_stride(seq_len, instance_size)
    received = 0
    for out in outputs.values():
        # as bytes: every backend gathers uint8, whatever the buffer's dtype
        rows = out.view(out.shape[0], -1).view(torch.uint8)  # contiguous (make_outputs)
        assert rows.shape[0] == stride * instance_size
        mine = rows[index * stride:(index + 1) * stride]
        if out.device.type == "cuda":  # NCCL: one thread at a time issues to a device
            with device_lock(out.device):
                _all_gather(rows, mine, group=group)
        else:
            _all_gather(rows, mine, group=group)
        received += rows[0].nbytes * stride * (instance_size - 1)
    for out in outputs.values():
        if out.device.type == "cuda":  # host-observed before the room is reported done
            torch.cuda.current_stream(out.device).synchronize()
            break
    return received
