"""Point-to-point transport for one pair, over an injected process group.

A pair is one ordered stream: frames are a meta tensor, then (DATA only) the
payload tensors in plan order. No tags anywhere: sends and recvs match by order
and size only, which is all NCCL offers, so Gloo runs the same way in tests.

Sends are posted at once (`post_frame`) by whichever thread schedules them and
completed later (`wait`) by the pair's completion thread, so the next frame is
on the wire without a thread hand-off. Receives and `wait` return only once
completion is host-observed: `Work.wait()`, then on CUDA an event recorded
after it has been seen complete, so no block is reused and no status changes
while a kernel may still touch the memory. Waits are
bounded by the pair group's timeout (Gloo closes the pair when it fires).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist

from .errors import PeerLost, TransferTimeout
from .wire import META_LEN, Meta


class Posted(NamedTuple):
    """A frame's posted sends, and every tensor they read (kept alive until done)."""

    works: list[dist.Work]
    tensors: list[torch.Tensor]


class PairTransport(Protocol):
    """What the sender and receiver state machines need from a pair."""

    peer: int

    def post_frame(self, meta: Meta, payload: list[torch.Tensor],
                   ready: torch.cuda.Event | None = None) -> Posted: ...

    def wait(self, posted: Posted, what: str = "send") -> None: ...

    def post_meta_recv(self) -> Posted: ...

    def wait_meta(self, posted: Posted) -> Meta: ...

    def post_recv(self, dsts: list[torch.Tensor]) -> Posted: ...


class TorchPairTransport:
    """`PairTransport` on a `torch.distributed` group holding this rank and `peer`.

    One thread may send and one thread may receive on it; the protocol gives
    each pair exactly one sender thread (Embedding side) and one receiver
    thread (Language side).
    """

    def __init__(self, group: dist.ProcessGroup, peer: int, device: torch.device,
                 timeout_s: float) -> None:
        self.group = group
        self.peer = peer
        self.device = device
        self.timeout_s = timeout_s
        # NCCL wants a pair's ops in one group launch; on Gloo a batch only adds
        # Python overhead (~10 us per op) to what are independent posts anyway
        self._batched = device.type == "cuda"

    def post_frame(self, meta: Meta, payload: list[torch.Tensor],
                   ready: torch.cuda.Event | None = None) -> Posted:
        """Post a frame's sends and return at once; `wait` completes them. Frames
        go out in the order they are posted: the caller orders the posts."""
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        # a meta tensor per frame: several frames may be in flight
        tensors = [meta.to_tensor().to(self.device), *payload]
        return Posted(self._post(dist.isend, tensors), tensors)

    def wait(self, posted: Posted, what: str = "send") -> None:
        self._complete(posted.works, what)

    def connect(self, *, sending: bool) -> None:
        """One tiny frame before any other: NCCL creates a pair's communicator on
        its first op, which must not happen later under the engine's lock."""
        t = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._complete(self._post(dist.isend if sending else dist.irecv, [t]), "connect")

    def post_meta_recv(self) -> Posted:
        """Post the recv of the next meta frame. The receiver posts it while the
        previous frame's payload still lands: a Gloo or NCCL send waits for its
        recv to be posted, so a late post costs a round trip per frame."""
        t = torch.empty(META_LEN, dtype=torch.int64, device=self.device)
        return Posted(self._post(dist.irecv, [t]), [t])

    def wait_meta(self, posted: Posted) -> Meta:
        self._complete(posted.works, "meta recv")
        return Meta.from_tensor(posted.tensors[0].cpu())

    def post_recv(self, dsts: list[torch.Tensor]) -> Posted:
        return Posted(self._post(dist.irecv, dsts), dsts)

    def _post(self, op: Callable[..., dist.Work | None],
              tensors: list[torch.Tensor]) -> list[dist.Work]:
        try:
            if self._batched:
                return dist.batch_isend_irecv(
                    [dist.P2POp(op, t, self.peer, group=self.group) for t in tensors])
            works = [op(t, self.peer, group=self.group) for t in tensors]
        except RuntimeError as e:  # the pair is already broken (e.g. the peer died)
            raise PeerLost(f"posting to/from rank {self.peer} failed: {str(e)[:200]}",
                           peer=self.peer) from e
        assert all(w is not None for w in works)  # we are a member of the pair group
        return works  # type: ignore[return-value]

    def _complete(self, works: list[dist.Work], what: str) -> None:
        try:
            for w in works:
                w.wait()
        except RuntimeError as e:
            text = str(e)
            if "Timed out" in text or "timeout" in text.lower():
                raise TransferTimeout(f"{what} to/from rank {self.peer} timed out after "
                                      f"{self.timeout_s:.0f}s: {text[:200]}",
                                      peer=self.peer) from e
            raise PeerLost(f"{what} with rank {self.peer} failed: {text[:200]}",
                           peer=self.peer) from e
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            deadline = time.monotonic() + self.timeout_s
            delay = 1e-5
            while not event.query():
                if time.monotonic() > deadline:
                    raise TransferTimeout(f"{what} with rank {self.peer}: CUDA work not "
                                          f"done after {self.timeout_s:.0f}s", peer=self.peer)
                time.sleep(delay)
                delay = min(delay * 2, 1e-3)
