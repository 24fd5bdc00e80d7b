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
