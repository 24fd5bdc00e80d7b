"""Point-to-point transport for one pair, over an injected process group.

A pair is one ordered stream: frames are a meta tensor, then (DATA only) the
payload tensors in plan order. No tags anywhere: sends and recvs match by order
and size only, which is all NCCL offers, so Gloo runs the same way in tests.

Every call returns only once completion is host-observed: `Work.wait()`, then on
CUDA an event recorded after it has been seen complete, so no block is reused
and no status changes while a kernel may still touch the memory. Waits are
bounded by the pair group's timeout (Gloo closes the pair when it fires).
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
import torch.distributed as dist

from .errors import PeerLost, TransferTimeout
from .wire import META_LEN, Meta


class PairTransport(Protocol):
    """What the sender and receiver state machines need from a pair."""

    peer: int

    def send_frame(self, meta: Meta, payload: list[torch.Tensor],
                   ready: torch.cuda.Event | None = None) -> None: ...

    def recv_meta(self) -> Meta: ...

    def recv_payload(self, dsts: list[torch.Tensor]) -> None: ...


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
        self._meta_send = torch.empty(META_LEN, dtype=torch.int64, device=device)
        self._meta_recv = torch.empty(META_LEN, dtype=torch.int64, device=device)

    def send_frame(self, meta: Meta, payload: list[torch.Tensor],
                   ready: torch.cuda.Event | None = None) -> None:
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        meta.to_tensor(self._meta_send)
        ops = [dist.P2POp(dist.isend, self._meta_send, self.peer, group=self.group)]
        ops += [dist.P2POp(dist.isend, t, self.peer, group=self.group) for t in payload]
        self._complete(dist.batch_isend_irecv(ops), "send")

    def recv_meta(self) -> Meta:
        work = dist.irecv(self._meta_recv, self.peer, group=self.group)
        assert work is not None  # we are a member of the pair group
        self._complete([work], "meta recv")
        return Meta.from_tensor(self._meta_recv.cpu())

    def recv_payload(self, dsts: list[torch.Tensor]) -> None:
        ops = [dist.P2POp(dist.irecv, t, self.peer, group=self.group) for t in dsts]
        self._complete(dist.batch_isend_irecv(ops), "payload recv")

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
