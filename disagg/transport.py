"""Point-to-point transport for one pair, over an injected process group.

A pair is one ordered stream: frames are a meta tensor, then (DATA only) the
payload tensors in plan order. No tags anywhere: sends and recvs match by order
and size only, which is all NCCL offers, so Gloo runs the same way in tests.

Sends are posted at once (`post_frame`) by whichever thread schedules them and
completed later (`wait`) by the pair's completion thread, so the next frame is
on the wire without a thread hand-off. Receives and `wait` return only once
completion is host-observed: on Gloo `Work.wait()`; on CUDA the host polls the
work's own end event (`Work.is_completed()`) before `Work.wait()`, so no block
is reused and no status changes while a kernel may still touch the memory, and
no stream of the caller's is ever made to wait for a peer. Waits are bounded by
the pair group's timeout (Gloo closes the pair when it fires). Every
allocation and post here is made on the device's library stream
(`streams.py`): an op waits for disagg's own work and a frame's producer
event, never for what the application queued on its streams, and a meta comes
to the host by a copy polled on that stream, not by a sync.

NCCL's rules (docs/nccl.md): every NCCL call this process makes on a device (a
post: a frame's sends, or its recvs, as one group launch on the pair's group,
`post_ops`; a group's creation and destruction) goes through that device's
lock, `device_lock`, so no two threads ever issue NCCL operations on one
device at once. Gloo has no such rule, and a Gloo post may wait milliseconds
for a busy pair: there each pair has a lock of its own (the same structure,
never contended across pairs).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, NamedTuple, Protocol

import torch
import torch.distributed as dist

from . import streams
from .errors import PeerLost, TransferTimeout
from .meta import META_LEN, Meta

# On CUDA, how late the host may see a frame's sends or payload recvs end (they
# are on their way: the receiver posts its payload recvs once the meta landed);
# a meta recv, which can stand for a whole encode, backs off to 1 ms
FRAME_POLL_S = 1e-4
META_POLL_S = 1e-3

_device_locks: dict[tuple[str, int], threading.Lock] = {}
_device_locks_guard = threading.Lock()


def device_lock(device: torch.device) -> threading.Lock:
    """The one lock through which every NCCL call of this process on `device`
    goes. NCCL forbids issuing operations in parallel, from several threads, to
    communicators on one device; disagg posts from several threads (the
    caller's, the control thread, one per pair), so each takes this lock for
    the call itself (never while waiting). An application that issues NCCL
    operations of its own on this device from a thread of its own while
    disagg runs can take it too. The same lock for every caller in the process."""
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if device.type == "cuda" else -1
    key = (device.type, index)
    lock = _device_locks.get(key)
    if lock is None:
        with _device_locks_guard:
            lock = _device_locks.setdefault(key, threading.Lock())
    return lock


def bind_device(device: torch.device | None) -> None:
    """Make `device` this thread's current CUDA device, and the library's stream
    on it (`streams.py`) its current stream (a no-op on the CPU). Every thread
    of disagg's calls it first: a thread whose first CUDA call (a post, a
    `Work.is_completed()`) finds no current device makes a context on GPU 0,
    about 0.5 GiB there for every process of the node, and a thread working on
    the device's default stream waits for the application's work queued there."""
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
        streams.use_library_stream(device)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """`t`'s memory as a flat uint8 view. A recv into a copy would lose its
    data, so a tensor that is not contiguous is a bug, said at once."""
    if not t.is_contiguous():
        raise ValueError(f"a {tuple(t.shape)} {t.dtype} tensor with strides {t.stride()} "
                         f"is not contiguous: pair ops carry whole byte ranges")
    return t.reshape(-1).view(torch.uint8)


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

    def post_frame_recv(self, dsts: list[torch.Tensor]) -> tuple[Posted, Posted | None]: ...

    def abort(self) -> None: ...


def post_ops(group: Any, peer: int, ops: list[tuple[bool, torch.Tensor]],
             *, coalesce: bool) -> list[dist.Work]:
    """Issue `ops` (send or recv, tensor) to `peer` on `group`, in order, and return
    the works to complete: one per op, or one for them all when `coalesce`.

    On NCCL (`supports_coalescing`) the ops go out as one coalescing block: one
    NCCL group launch for a frame's tensors instead of one launch each. torch
    issues the point-to-point ops of a block on the communicator of the group
    itself, the one `pairing.pair_group` made eagerly; a point-to-point op
    outside a block would go on a second communicator for the two ranks, which
    torch makes lazily at the first such op (here under the device lock, every
    other pair of the device waiting) and which holds buffers of its own. The
    block's one work (`_end_coalescing`) completes once every op in it has; an
    op that raises inside the block still ends it, so the group is never left
    open (issue 29, finding 2). Gloo has no coalescing: an op each. `group` is
    a backend object as `pairing.py` makes it (ProcessGroupNCCL or
    ProcessGroupGloo), whose coalescing calls take no device, unlike a
    registered ProcessGroup's."""
    def issue(send: bool, t: torch.Tensor) -> dist.Work:
        return group.send([t], peer, 0) if send else group.recv([t], peer, 0)

    if not coalesce:
        return [issue(send, t) for send, t in ops]
    group._start_coalescing()
    try:
        for send, t in ops:
            issue(send, t)
    except BaseException:
        with contextlib.suppress(Exception):
            group._end_coalescing()
        raise
    work = group._end_coalescing()
    if work is None:  # no op issued: nothing to wait for (never so for a post)
        return []
    return [work]


def is_open(t: PairTransport) -> bool:
    """Whether posts on `t` need no group made first: a pair made on demand
    (`links.PairLink`) is made by its own thread, never by a caller."""
    fn = getattr(t, "is_open", None)
    return fn is None or bool(fn())


class TorchPairTransport:
    """`PairTransport` on a `torch.distributed` group holding this rank and `peer`.

    One thread may send and one thread may receive on it; the protocol gives
    each pair exactly one sender thread (Embedding side) and one receiver
    thread (Language side). Posts may come from any thread: each holds the
    post lock (the device's on CUDA) for the call alone.
    """

    def __init__(self, group: dist.ProcessGroup, peer: int, device: torch.device,
                 timeout_s: float, *, group_peer: int) -> None:
        self.group = group
        self.peer = peer
        self.device = device
        self.timeout_s = timeout_s
        self._cuda = device.type == "cuda"
        # The pair's group is made by the backend's own constructor on a prefix of
        # the store (`pairing.py`), not registered with any default world, so its
        # ops go through the group object, addressed by the peer's rank in the
        # group (`group_peer`); see `post_ops` for how a post's tensors go out.
        self._group_peer = group_peer
        self._coalesce = bool(getattr(group, "supports_coalescing", False))
        self._post_lock = device_lock(device) if self._cuda else threading.Lock()
        self.aborted = False

    def abort(self) -> None:
        """End every op standing on the pair now: the pair is lost (its peer
        declared dead, its stream broken) or torn down with an op still pending.
        On NCCL the communicator is aborted, before the rank reuses the memory
        under a posted recv or says FAILED: no frame can land later, and no
        watchdog timeout of a pending op takes the process down. On Gloo a no-op:
        its pending ops end with an error once the peer's connection closes (or
        at the pair's timeout, which closes it). No post is made after it."""
        self.aborted = True
        if not self._cuda:
            return
        with self._post_lock, contextlib.suppress(Exception):  # broken already: fine
            self.group.abort()

    def post_frame(self, meta: Meta, payload: list[torch.Tensor],
                   ready: torch.cuda.Event | None = None) -> Posted:
        """Post a frame's sends and return at once; `wait` completes them. Frames
        go out in the order they are posted: the caller orders the posts."""
        if ready is not None:
            # NCCL's stream waits for the poster's current stream (torch's rule),
            # the library stream (`_post`), and that one for the producer's event:
            # the sends read finished data, and nobody's host waits for it
            streams.wait_for(self.device, [ready])
        # a meta tensor per frame (several frames may be in flight), copied to the
        # device without the host waiting for the producer
        tensors = [streams.to_device(meta.to_tensor(), self.device), *payload]
        return Posted(self._post(True, tensors), tensors)

    def wait(self, posted: Posted, what: str = "send") -> None:
        self._complete(posted.works, what, FRAME_POLL_S)

    def connect(self, *, sending: bool) -> None:
        """One tiny frame each way before any other, as the pair forms
        (`pairing.PairMaker`, after both ends said hello): a first op on NCCL
        that would create a communicator made lazily happens here, not later
        under the engine's lock."""
        with streams.on_library_stream(self.device):
            t = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._complete(self._post(sending, [t]), "connect")
        # and back: each end returns only once the other's first op is done, so
        # neither tears the group down (a peer that shuts down at once) under an
        # op of the other's still in flight
        self._complete(self._post(not sending, [t]), "connect")

    def post_meta_recv(self) -> Posted:
        """Post the recv of the next meta frame. The receiver posts it while the
        previous frame's payload still lands: a Gloo or NCCL send waits for its
        recv to be posted, so a late post costs a round trip per frame."""
        t = self._meta_buffer()
        return Posted(self._post(False, [t]), [t])

    def wait_meta(self, posted: Posted) -> Meta:
        self._complete(posted.works, "meta recv", META_POLL_S)
        return Meta.from_tensor(self._to_host(posted.tensors[0], "meta recv"))

    def post_recv(self, dsts: list[torch.Tensor]) -> Posted:
        return Posted(self._post(False, dsts), dsts)

    def post_frame_recv(self, dsts: list[torch.Tensor]) -> tuple[Posted, Posted | None]:
        """Post the recvs of a whole frame whose sizes are known ahead (pre-posted):
        its meta, then `dsts`, in one post (on NCCL one group launch, whose one work
        both halves wait: a frame's sends complete together). The meta's, and the
        payload's or None."""
        meta = self._meta_buffer()
        works = self._post(False, [meta, *dsts])
        if not dsts:
            return Posted(works, [meta]), None
        if self._coalesce:
            return Posted(works, [meta]), Posted(works, dsts)
        return Posted(works[:1], [meta]), Posted(works[1:], dsts)

    def _meta_buffer(self) -> torch.Tensor:
        with streams.on_library_stream(self.device):  # it may run on a caller's thread
            return torch.empty(META_LEN, dtype=torch.int64, device=self.device)

    def _to_host(self, t: torch.Tensor, what: str) -> torch.Tensor:
        try:
            return streams.to_host(t, self.timeout_s)
        except TransferTimeout as e:
            raise TransferTimeout(f"{what} with rank {self.peer}: {e}", peer=self.peer) from e

    def _post(self, send: bool, tensors: list[torch.Tensor]) -> list[dist.Work]:
        # Every op carries the bytes of its tensor (a view, no copy): both ends
        # agree on sizes in bytes already, and no dtype can then be one the
        # backend lacks (NCCL has no int16).
        tensors = [as_bytes(t) for t in tensors]
        if self.aborted:
            raise PeerLost(f"the pair with rank {self.peer} was aborted", peer=self.peer)
        try:
            # the op's NCCL stream waits for the library stream (streams.py), never
            # for the application's; NCCL: one thread at a time issues to the device
            with streams.on_library_stream(self.device), self._post_lock:
                return post_ops(self.group, self._group_peer, [(send, t) for t in tensors],
                                coalesce=self._coalesce)
        except RuntimeError as e:  # the pair is already broken (e.g. the peer died)
            raise PeerLost(f"posting to/from rank {self.peer} failed: {e}",
                           peer=self.peer) from e

    def _complete(self, works: list[dist.Work], what: str, longest: float = META_POLL_S) -> None:
        try:
            # Host-observed: on CUDA the work's own end event, polled. Work.wait()
            # alone would only make this thread's current stream wait for the peer,
            # which for a meta recv lasts as long as the peer's encoder takes.
            done = streams.observed(works, self.device, time.monotonic() + self.timeout_s,
                                    longest)
            if done:
                for w in works:
                    w.wait()  # on CUDA, once complete: only raises the work's error
        except RuntimeError as e:
            text = str(e)
            if "Timed out" in text or "timeout" in text.lower():
                raise TransferTimeout(f"{what} to/from rank {self.peer} timed out after "
                                      f"{self.timeout_s:.0f}s: {text}",
                                      peer=self.peer) from e
            raise PeerLost(f"{what} with rank {self.peer} failed: {text}",
                           peer=self.peer) from e
        if not done:
            raise TransferTimeout(f"{what} with rank {self.peer}: CUDA work not done after "
                                  f"{self.timeout_s:.0f}s", peer=self.peer)
