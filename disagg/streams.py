"""CUDA streams: the one stream per device on which disagg does its device
work, and how the application's streams are ordered against it. On the CPU
every function here is the plain operation or a no-op.

The rules (docs/nccl.md, "Streams"):

- **One library stream per device** (`library_stream`). Every allocation,
  copy and post disagg makes on a device is made there: its threads make it
  their current stream when they start (`transport.bind_device`), and the
  calls that run on a caller's thread (`send()`'s posts, a pre-posted frame's
  recvs, result tensors, scatter's all-gather) enter it (`on_library_stream`).
  An NCCL op's stream waits for the poster's current stream, so a post waits
  for disagg's own work only, never for what the application queued on its
  streams (the device's default stream included).
- **Producer to library: events.** `send()` records an event on the caller's
  current stream (one per part of a progressive send); the library stream
  waits for it before the frame's sends are posted. disagg never makes an
  application stream wait and never synchronises one.
- **Library to host: events, polled.** A meta frame's trip to the host, pool
  mode's copy-out and scatter's all-gather end with an event on the library
  stream (or the NCCL work's own) that the host polls (`to_host`, `settle`);
  a room's status changes only after that.
- **Library to the Language caller: nothing left to order, and the
  allocator told.** A result is handed over only once the host saw it land.
  Its memory was allocated on the library stream; `hand_over` marks it used by
  the stream current at `result()`, `prefix()` or `step()` (`record_stream`),
  so the caching allocator gives it to nothing else of the library's before
  the kernels that caller queued there are done.
- **Caller to library, memory handed back:** `recycle()` records an event on
  the caller's current stream; a set is reused only once it is done
  (`recycle.py`).

The price of one stream: a frame's sends wait for every producer event the
library stream was told to wait for before it, also other rooms' (the
encoder's earlier work, in practice done already).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .errors import TransferTimeout

# A copy of a few bytes behind disagg's own queued work: a device that does
# not finish it in this time is wedged
HOST_READ_TIMEOUT_S = 60.0

_streams: dict[int, torch.cuda.Stream] = {}
_guard = threading.Lock()


# The CUDA calls below that a CPU-only test stands in for (tests/test_streams.py)

def _cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory()


def _pinned_empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)


def _record_stream(t: torch.Tensor, s: torch.cuda.Stream) -> None:
    t.record_stream(s)


def _index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def library_stream(device: torch.device) -> torch.cuda.Stream | None:
    """disagg's stream on `device` (None on the CPU): one per device per process,
    made on first use and kept for the process's life, as torch keeps its own."""
    if not _cuda(device):
        return None
    index = _index(device)
    s = _streams.get(index)
    if s is None:
        with _guard:
            s = _streams.get(index)
            if s is None:
                s = _streams[index] = torch.cuda.Stream(device=torch.device("cuda", index))
    return s


_NO_STREAM = contextlib.nullcontext()


def on_library_stream(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The library stream as this thread's current stream, for the block (on
    the CPU nothing: every post goes through here, so it costs nothing there)."""
    s = library_stream(device)
    return _NO_STREAM if s is None else torch.cuda.stream(s)


def use_library_stream(device: torch.device) -> None:
    """The library stream as this thread's current stream from now on: a
    library thread's first call (`transport.bind_device`)."""
    s = library_stream(device)
    if s is not None:
        torch.cuda.set_stream(s)


def producer_event(device: torch.device) -> torch.cuda.Event | None:
    """An event after the work queued so far on the caller's current stream: what
    a send waits for before reading the caller's tensors."""
    if not _cuda(device):
        return None
    e = torch.cuda.Event()
    e.record(torch.cuda.current_stream(device))
    return e


def wait_for(device: torch.device, events: Iterable[torch.cuda.Event]) -> None:
    """The library stream waits (on the device, not the host) for each event."""
    s = library_stream(device)
    if s is not None:
        for e in events:
            s.wait_event(e)


def joined_event(device: torch.device) -> torch.cuda.Event | None:
    """An event after what the library stream holds now."""
    s = library_stream(device)
    if s is None:
        return None
    e = torch.cuda.Event()
    e.record(s)
    return e


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (a meta, an ABORT's reason, aux values) on `device`,
    without the host waiting: a pinned copy queued on the library stream (a
    plain `.to(device)` synchronises the current stream, on the Embedding side
    until the producer's work is done). The pinned buffer stays the caching
    host allocator's until the copy is done."""
    if not _cuda(device):
        return t.to(device)
    with on_library_stream(device):
        return _pinned(t).to(device, non_blocking=True)


def to_host(t: torch.Tensor, timeout_s: float = HOST_READ_TIMEOUT_S) -> torch.Tensor:
    """A small device tensor that has landed (host-observed), on the host: copied
    on the library stream and polled, so the host waits for that copy and
    disagg's own work before it, never for the application's streams (a plain
    `.cpu()` synchronises the current stream). `TransferTimeout` past `timeout_s`."""
    if not _cuda(t.device):
        return t
    host = _pinned_empty(t)
    with on_library_stream(t.device):
        host.copy_(t, non_blocking=True)
    if not settle(t.device, timeout_s):
        raise TransferTimeout(f"reading {t.nbytes} bytes back from {t.device}: not done "
                              f"after {timeout_s:.0f}s")
    return host


def settle(device: torch.device, timeout_s: float = HOST_READ_TIMEOUT_S) -> bool:
    """Wait, on the host, for what the library stream holds now (pool mode's
    copy-out, a host read): an event, polled. Whether it was done in time."""
    e = joined_event(device)
    return e is None or wait_until(e.query, time.monotonic() + timeout_s)


def hand_over(tensors: Iterable[torch.Tensor]) -> None:
    """Result memory (made on the library stream) given to the caller: marked
    used by the caller's current stream, so the caching allocator reuses it
    only after the kernels queued there when it is freed. Call it on the
    thread, and with the stream, that will use the result."""
    for t in tensors:
        if _cuda(t.device):
            _record_stream(t, torch.cuda.current_stream(t.device))


def observed(works: Iterable[Any], device: torch.device, deadline: float,
             longest: float = 1e-3) -> bool:
    """Whether `works` (NCCL or Gloo works on `device`) ended by `deadline`, seen
    by the host: on CUDA each work's own end event is polled (`wait_until`),
    since a work's `wait()` alone only makes the current stream wait for it; on
    the CPU at once, Gloo's `wait()` blocking, bounded by its group's timeout.
    The caller then calls each work's `wait()`, which reports its error."""
    return not _cuda(device) or all(wait_until(w.is_completed, deadline, longest)
                                    for w in works)


def wait_until(done: Callable[[], bool], deadline: float, longest: float = 1e-3) -> bool:
    """Poll `done` (a CUDA event's or a NCCL work's completion) until it is true
    or `time.monotonic()` passes `deadline`; whether it became true. Sleeps
    between looks, 10 us doubling to `longest`: a wait is seen late by at most
    about its own length (the delay doubles with the time waited) and never
    more than `longest`, and a waiting thread leaves the GIL to the others."""
    delay = 1e-5
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, longest)
    return True
