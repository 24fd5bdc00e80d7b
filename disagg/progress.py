"""Which thread moves a chunk, and how often a thread wakes for it: the one
place that says so, and the two policies that are the callers' side of it.

Threads of a rank, and what each does for one chunk (the machines decide what;
these only say who):

| side | thread | does | wakes per chunk |
| --- | --- | --- | --- |
| Embedding | control | reads the ALLOC or RESUME, asks the machine, posts the frame's sends at once (`SendStreams.flush`, after the lock) | 1 (the message) |
| Embedding | pair (`disagg-send-*`) | waits for the posted frame's sends in stream order, reports each (`frame_done`) | 2 (a frame posted; its sends done) |
| Embedding | caller | `send()` schedules and posts what grants already wait for; `wait()`/`poll()` | 1 (the room ended), in `wait()` |
| Language | caller | `init()`/`resume()` sends the ALLOC/RESUME itself (no hop) and, when the pair's thread is idle, posts a pre-posted frame's recvs itself (`pair.RecvPair.handed`) | 1 (the room ended, or asks a resume), in `wait()` |
| Language | pair (`disagg-recv-*`) | reads the stream: a frame's meta, then its payload recv (its sizes come with the meta); a pre-posted frame's recvs are up already, and it waits for the payload first | 2 per frame read meta first, 1 per pre-posted frame |
| Language | control | heartbeats, REJECTs, timeouts | 0 |

So a chunk costs 4 Python wake-ups on the critical path when its length is
not known ahead (Embedding control, Language pair twice, the Language
caller), 3 when its recvs are pre-posted (a declared `seq_len`, or a RESUME
once the sender holds the whole room). `scripts/wakeups.py` counts them with
the kernel's voluntary context switches per thread.

A wake-up is a thread that blocked in C (a socket, a Work, a condition) and
needs the GIL back. A caller that holds the GIL between its calls (a spinning
caller, a serving loop) decides when that is: CPython gives a waiting thread
the GIL only when the holder blocks or after its switch interval (5 ms). Two
policies, both here:

- **the pause** (`Progress.pause`): a status call (`poll()`) that finds the
  room not ended waits on the engine's condition for up to `PAUSE_S`, at most
  once per `PAUSE_WINDOW_S` per caller thread, so a sweep over many rooms
  pays it once. The library's threads get the GIL then, without any
  interpreter setting changed. A serving loop therefore sees a step a thread
  could take at its next `poll()`: each wake-up on the critical path costs it
  up to one loop iteration, which is what bounds small rooms in such a loop
  (docs/performance.md).
- **the sweep** (`Progress.sweep_due`): the control thread ticks after every
  message it handles; the pass over every live room for timeouts (which are
  seconds-scale) runs at most every `SWEEP_S`, so a busy pair's messages are
  not each an O(rooms) pass under the engine lock.
"""

from __future__ import annotations

import threading
import time

PAUSE_S = 200e-6
PAUSE_WINDOW_S = 200e-6
SWEEP_S = 0.05


class Progress:
    """One engine's progress policies (see the module docstring)."""

    def __init__(self, cond: threading.Condition) -> None:
        self._cond = cond
        self._paused = threading.local()  # per caller thread: when it last paused
        self._swept = float("-inf")  # when `sweep_due` last said yes

    def pause(self) -> None:
        """Called by a status call that found nothing final: wait up to PAUSE_S
        for any room's change (notified), at most once per PAUSE_WINDOW_S per
        thread, so the engine's threads get the GIL from a spinning caller."""
        now = time.perf_counter()
        if now - getattr(self._paused, "at", 0.0) < PAUSE_WINDOW_S:
            return
        with self._cond:
            self._cond.wait(PAUSE_S)
        self._paused.at = time.perf_counter()

    def sweep_due(self, now: float) -> bool:
        """Whether the control thread's tick looks at every live room for
        timeouts now (at most every SWEEP_S)."""
        if now - self._swept < SWEEP_S:
            return False
        self._swept = now
        return True
