"""The pair transport's contract with the backend, without a backend: a fake
process group records what each op is given (issue 29: NCCL ops carry byte
views, so no dtype can be one NCCL lacks, and a non-contiguous tensor is
refused rather than received into a copy)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disagg.meta import FrameKind, Meta
from disagg.transport import TorchPairTransport, as_bytes


class DoneWork:
    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class RecordingGroup:
    """What `TorchPairTransport` calls on a jobs-mode pair group."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, torch.Tensor]] = []

    def send(self, tensors: list[torch.Tensor], peer: int, tag: int) -> DoneWork:
        self.ops += [("send", t) for t in tensors]
        return DoneWork()

    def recv(self, tensors: list[torch.Tensor], peer: int, tag: int) -> DoneWork:
        self.ops += [("recv", t) for t in tensors]
        return DoneWork()


def transport() -> tuple[TorchPairTransport, RecordingGroup]:
    g = RecordingGroup()
    return TorchPairTransport(g, 1, torch.device("cpu"), 5.0, group_peer=1), g  # type: ignore[arg-type]


def test_every_op_carries_a_byte_view_of_its_tensor_whatever_the_dtype() -> None:
    t, g = transport()
    emb = torch.randn(6, 8).to(torch.bfloat16)
    extra = torch.arange(12, dtype=torch.int16).reshape(6, 2)  # no such dtype in NCCL
    flags = torch.ones(6, dtype=torch.bool)
    t.post_frame(Meta(FrameKind.DATA, 3), [emb[2:5], extra, flags])
    t.post_recv([torch.empty(4, 3, dtype=torch.float64)])
    t.post_meta_recv()
    assert [op for op, _ in g.ops] == ["send"] * 4 + ["recv"] * 2
    for _, x in g.ops:
        assert x.dtype is torch.uint8 and x.dim() == 1
    sent = [x for op, x in g.ops if op == "send"]
    assert sent[1].data_ptr() == emb[2:5].data_ptr() and sent[1].numel() == 3 * 8 * 2
    assert torch.equal(sent[2], extra.view(-1).view(torch.uint8))  # the same bytes, no copy
    assert sent[2].data_ptr() == extra.data_ptr()
    assert sent[3].numel() == 6


def test_a_tensor_that_is_not_contiguous_is_refused_not_copied() -> None:
    t, g = transport()
    rows = torch.zeros(8, 4)
    with pytest.raises(ValueError, match="not contiguous"):
        t.post_recv([rows[:, :2]])  # a recv into a copy would land nowhere
    assert g.ops == []
    assert as_bytes(rows[2:4]).numel() == 2 * 4 * 4  # row slices are contiguous


def test_an_op_that_raises_inside_a_batched_launch_leaves_no_group_open(monkeypatch) -> None:
    """Issue 29, finding 2: torch's coalescing manager has no try/finally, so an op
    that raises inside `batch_isend_irecv` (a broken or aborted NCCL pair) left
    the group's coalescing open. `transport.batched` closes it, and the error
    still reaches the caller. torch's behaviour is reproduced by a stand-in."""
    import torch.distributed as dist

    from disagg import transport as tr

    state = dist.distributed_c10d._world.pg_coalesce_state
    calls: list[str] = []

    class Group:
        def _start_coalescing(self, device: torch.device) -> None:
            calls.append("start")

        def _end_coalescing(self, device: torch.device) -> None:
            calls.append("end")
            raise RuntimeError("NCCL communicator was aborted")  # its own error: not reported

    g = Group()

    def torch_batch(ops: list) -> list:  # what torch does, up to the op that raises
        state.setdefault(ops[0].group, [])
        ops[0].group._start_coalescing(torch.device("cpu"))
        raise RuntimeError("NCCL error: remote process exited")

    monkeypatch.setattr(dist, "batch_isend_irecv", torch_batch)
    monkeypatch.setattr(dist, "P2POp", lambda op, t, peer, group: type(
        "Op", (), {"group": group})())
    with pytest.raises(RuntimeError, match="remote process exited"):
        tr.batched(g, torch.device("cpu"), dist.isend, 1, [torch.zeros(2)])  # type: ignore[arg-type]
    assert calls == ["start", "end"] and g not in state
    tr.close_coalescing(g, torch.device("cpu"))  # nothing open: a no-op
    assert calls == ["start", "end"]
