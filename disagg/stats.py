"""Counters, gauges and latency samples behind `ctx.stats()`: cheap to update
from any thread, summarised on read."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

import numpy as np

MAX_SAMPLES = 4096  # per latency series: a sliding window, so memory stays bounded


class Stats:
    def __init__(self, **gauges: int) -> None:
        self._lock = threading.Lock()
        self._counters: collections.Counter[str] = collections.Counter(
            bytes_sent=0, bytes_received=0, chunks=0, resumes=0, failures=0,
            auto_alloc_resumes_avoided=0, auto_alloc_overallocated_blocks=0)
        self._failures: collections.Counter[str] = collections.Counter()
        self._gauges: dict[str, int] = dict(gauges)
        self._samples: dict[str, collections.deque[float]] = {}  # seconds
        self._sizes: dict[str, collections.deque[float]] = {}  # bytes per room
        self._sources: list[Callable[[], dict[str, object]]] = []

    def add_source(self, fn: Callable[[], dict[str, object]]) -> None:
        """`fn` adds fields computed at read time (e.g. rooms live per peer)."""
        self._sources.append(fn)

    def add(self, **counts: int) -> None:
        with self._lock:
            self._counters.update(counts)

    def failure(self, cause: str) -> None:
        """Count a failed room under `cause` (a `FailureCause` or its value)."""
        cause = str(getattr(cause, "value", cause))
        with self._lock:
            self._counters["failures"] += 1
            self._failures[cause] += 1

    def set_gauge(self, name: str, value: int) -> None:
        self._gauges[name] = value

    def observe(self, series: str, seconds: float) -> None:
        self._sample(self._samples, series, seconds)

    def observe_bytes(self, series: str, nbytes: int) -> None:
        """A per-room byte count (e.g. what one room cost the Embedding rank's link)."""
        self._sample(self._sizes, series, float(nbytes))

    def _sample(self, into: dict[str, collections.deque[float]], series: str,
                value: float) -> None:
        with self._lock:
            q = into.get(series)
            if q is None:
                q = into[series] = collections.deque(maxlen=MAX_SAMPLES)
            q.append(value)

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            out: dict[str, object] = dict(self._gauges)
            out.update(self._counters)
            out["failures_by_cause"] = dict(self._failures)
            out["latency_s"] = _summaries(self._samples)
            out["bytes_per_room"] = _summaries(self._sizes)
        for fn in self._sources:
            out.update(fn())
        return out


def _summaries(series: dict[str, collections.deque[float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, q in series.items():
        if q:
            a = np.fromiter(q, dtype=np.float64)
            out[name] = {"count": float(a.size), "p50": float(np.percentile(a, 50)),
                         "p99": float(np.percentile(a, 99)), "max": float(a.max())}
    return out
