"""The pair transport's contract with the backend, without a backend: a fake
process group records what each op is given (issue 29: NCCL ops carry byte
views, so no dtype can be one NCCL lacks, and a non-contiguous tensor is
refused rather than received into a copy; on a backend that coalesces, a post
is one block with one work, never left open)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disagg.errors import PeerLost
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


class CoalescingGroup(RecordingGroup):
    """A backend with coalescing, as ProcessGroupNCCL: ops inside a block return
    no work of their own (what torch's NCCL backend gives back there is not a
    handle to wait on), the block's end returns the one work; `fail_at` makes
    the n-th op of a block raise, as an op on a broken communicator does."""

    supports_coalescing = True

    def __init__(self, fail_at: int = -1) -> None:
        super().__init__()
        self.open = False
        self.fail_at = fail_at
        self.in_block = 0
        self.ends: list[DoneWork] = []

    def _start_coalescing(self) -> None:
        assert not self.open, "a block started inside another"
        self.open, self.in_block = True, 0
        self.ops.append(("start", torch.empty(0)))

    def _end_coalescing(self) -> DoneWork:
        assert self.open, "a block ended that was not started"
        self.open = False
        self.ops.append(("end", torch.empty(0)))
        self.ends.append(DoneWork())
        return self.ends[-1]

    def send(self, tensors: list[torch.Tensor], peer: int, tag: int) -> None:  # type: ignore[override]
        self._op()
        super().send(tensors, peer, tag)

    def recv(self, tensors: list[torch.Tensor], peer: int, tag: int) -> None:  # type: ignore[override]
        self._op()
        super().recv(tensors, peer, tag)

    def _op(self) -> None:
        assert self.open, "an op outside a block: it would go on a second, lazily made communicator"
        self.in_block += 1
        if self.in_block == self.fail_at:
            raise RuntimeError("NCCL error: remote process exited or there was a network error")


def coalescing(fail_at: int = -1) -> tuple[TorchPairTransport, CoalescingGroup]:
    g = CoalescingGroup(fail_at)
    return TorchPairTransport(g, 1, torch.device("cpu"), 5.0, group_peer=1), g  # type: ignore[arg-type]


def test_on_a_backend_that_coalesces_a_frame_is_one_block_with_one_work_to_wait() -> None:
    t, g = coalescing()
    emb, ids = torch.randn(4, 8), torch.arange(8)
    posted = t.post_frame(Meta(FrameKind.DATA, 3), [emb, ids])
    assert [op for op, _ in g.ops] == ["start", "send", "send", "send", "end"]
    assert posted.works == [g.ends[-1]] and len(posted.tensors) == 3
    t.wait(posted)
    t.post_meta_recv()  # a block of one
    assert [op for op, _ in g.ops[5:]] == ["start", "recv", "end"]


def test_a_pre_posted_frame_is_one_block_its_meta_and_payload_share_the_work() -> None:
    t, g = coalescing()
    dsts = [torch.empty(4, 8), torch.empty(8, dtype=torch.int64)]
    meta, payload = t.post_frame_recv(dsts)
    assert [op for op, _ in g.ops] == ["start", "recv", "recv", "recv", "end"]
    assert payload is not None and meta.works == payload.works == [g.ends[-1]]
    assert g.ops[2][1].data_ptr() == dsts[0].data_ptr()  # the payload lands in place
    assert payload.tensors == dsts
    meta_only, none = t.post_frame_recv([])
    assert none is None and len(meta_only.tensors) == 1
    assert [op for op, _ in g.ops[5:]] == ["start", "recv", "end"]


def test_without_coalescing_a_pre_posted_frame_splits_its_works() -> None:
    t, g = transport()
    dsts = [torch.empty(4, 8), torch.empty(8, dtype=torch.int64)]
    meta, payload = t.post_frame_recv(dsts)
    assert [op for op, _ in g.ops] == ["recv"] * 3
    assert payload is not None and len(meta.works) == 1 and len(payload.works) == 2


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_an_op_that_raises_inside_a_block_still_ends_it_and_says_the_pair_is_lost(
        fail_at: int) -> None:
    t, g = coalescing(fail_at)
    with pytest.raises(PeerLost, match="rank 1"):
        t.post_frame(Meta(FrameKind.DATA, 3), [torch.randn(4, 8), torch.arange(8)])
    assert not g.open, "the group was left open: later ops would never launch"
    assert [op for op, _ in g.ops][-1] == "end" and len(g.ends) == 1
    g.fail_at = -1  # the next post starts a block of its own
    t.post_recv([torch.empty(3)])
    assert [op for op, _ in g.ops][-3:] == ["start", "recv", "end"]
