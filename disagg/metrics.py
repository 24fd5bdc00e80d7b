"""Optional Prometheus exporter of `ctx.stats()` (`pip install "disagg[metrics]"`).

Off unless asked for: `disagg.metrics.serve_prometheus(ctx, port)` starts an HTTP
endpoint whose every scrape reads `ctx.stats()` afresh (counters, pool gauges,
live rooms per peer, failures by cause, latency p50/p99/max per stage), labelled
with the rank and role. `ctx.shutdown()` stops it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

COUNTERS = ("bytes_sent", "bytes_received", "chunks", "resumes", "failures",
            "auto_alloc_overallocated_blocks",
            # the item cache (Language ranks with item_cache_bytes; 0 elsewhere)
            "item_hits", "item_misses", "item_bytes_reused", "item_evictions")
# auto_alloc_resumes_avoided goes negative when "auto" spends rounds to save memory
GAUGES = ("pool_total_blocks", "pool_free_blocks", "rooms_live", "auto_alloc_resumes_avoided",
          "item_cache_bytes")


class _HasStats(Protocol):
    rank: int
    role: str

    def stats(self) -> dict[str, object]: ...


def collect(ctx: _HasStats) -> Iterator[Any]:
    """Metric families for one scrape of `ctx.stats()`."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    st = ctx.stats()
    base = {"rank": str(ctx.rank), "role": ctx.role}

    def family(cls: Callable[..., Any], name: str, doc: str, *extra: str) -> Any:
        return cls(f"disagg_{name}", doc, labels=[*base, *extra])

    for name in COUNTERS:
        c = family(CounterMetricFamily, name, f"ctx.stats()['{name}']")
        c.add_metric(list(base.values()), float(st.get(name, 0)))  # type: ignore[arg-type]
        yield c
    for name in GAUGES:
        g = family(GaugeMetricFamily, name, f"ctx.stats()['{name}']")
        g.add_metric(list(base.values()), float(st.get(name, 0)))  # type: ignore[arg-type]
        yield g
    causes = family(CounterMetricFamily, "failures_by_cause", "failed rooms by cause", "cause")
    for cause, n in dict(st.get("failures_by_cause", {})).items():  # type: ignore[call-overload]
        causes.add_metric([*base.values(), cause], float(n))
    yield causes
    peers = family(GaugeMetricFamily, "rooms_live_by_peer", "live rooms per peer rank", "peer")
    for peer, n in dict(st.get("rooms_live_by_peer", {})).items():  # type: ignore[call-overload]
        peers.add_metric([*base.values(), str(peer)], float(n))
    yield peers
    lat = family(GaugeMetricFamily, "latency_seconds",
                 "recent per-stage latency (sliding window)", "stage", "quantile")
    for stage, q in dict(st.get("latency_s", {})).items():  # type: ignore[call-overload]
        for label, key in (("0.5", "p50"), ("0.99", "p99"), ("1", "max")):
            lat.add_metric([*base.values(), stage, label], float(q[key]))
    yield lat


class PrometheusExporter:
    """A running endpoint; `close()` stops its thread (idempotent)."""

    def __init__(self, ctx: _HasStats, port: int, addr: str) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        class _Collector:
            def collect(self) -> Iterator[Any]:
                return collect(ctx)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector())
        self._server, self._thread = start_http_server(port, addr=addr, registry=registry)
        self.port: int = self._server.server_address[1]
        self._closed = threading.Event()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def serve_prometheus(ctx: Any, port: int = 0, addr: str = "127.0.0.1") -> PrometheusExporter:
    """Expose `ctx.stats()` at http://addr:port/metrics (port 0: pick a free one,
    see `.port`). Stopped by `ctx.shutdown()` or `close()`."""
    try:
        exporter = PrometheusExporter(ctx, port, addr)
    except ImportError as e:
        raise ImportError('the Prometheus exporter needs prometheus-client: '
                          'pip install "disagg[metrics]"') from e
    on_shutdown = getattr(ctx, "on_shutdown", None)
    if on_shutdown is not None:
        on_shutdown(exporter.close)
    return exporter
