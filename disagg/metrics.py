"""Optional Prometheus exporter of `ctx.stats()` (`pip install "disagg[metrics]"`).

Off unless asked for: `disagg.metrics.serve_prometheus(ctx, port)` starts an HTTP
endpoint whose every scrape reads `ctx.stats()` afresh (counters, pool gauges,
live rooms per peer, failures by cause, latency p50/p99/max per stage, and per
peer whether it is alive and its pair up), labelled with the rank and role, and
a readiness route, /health (200 or 503 with the reason). `ctx.shutdown()`
stops it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

COUNTERS = ("bytes_sent", "bytes_received", "chunks", "resumes", "failures",
            "auto_alloc_overallocated_blocks",
            # the item cache (Language ranks with item_cache_bytes; 0 elsewhere)
            "item_hits", "item_misses", "item_bytes_reused", "item_evictions",
            # pair groups made on demand and closed (links.py)
            "pairs_created", "pairs_closed")
# auto_alloc_resumes_avoided goes negative when "auto" spends rounds to save memory
GAUGES = ("pool_total_blocks", "pool_free_blocks", "rooms_live", "auto_alloc_resumes_avoided",
          "item_cache_bytes", "pairs_live")


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
    health = getattr(ctx, "health", None)
    if health is None:
        return
    alive = family(GaugeMetricFamily, "peer_alive", "1 if the peer is heard and its pair usable",
                   "peer")
    up = family(GaugeMetricFamily, "pair_up", "1 if the pair with the peer is not lost", "peer")
    for peer, h in health().items():
        alive.add_metric([*base.values(), str(peer)], float(bool(h["alive"])))
        up.add_metric([*base.values(), str(peer)], float(h["pair"] == "ok"))
    yield alive
    yield up
    readiness = getattr(ctx, "readiness", None)
    if readiness is not None:
        ready = family(GaugeMetricFamily, "ready", "1 if ctx.readiness() says ready")
        ready.add_metric(list(base.values()), float(bool(readiness()["ready"])))
        yield ready


def health_app(ctx: Any, metrics_app: Callable[..., Any]) -> Callable[..., Any]:
    """A WSGI app: /health answers 200 or 503 with `ctx.readiness()` as JSON (the
    reason says why not); every other path is the metrics."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO", "").rstrip("/") != "/health":
            return metrics_app(environ, start_response)
        try:
            report = ctx.readiness()
        except Exception as e:  # a probe must answer, whatever broke
            report = {"ready": False, "reason": f"readiness() raised {type(e).__name__}: {e}"}
        body = json.dumps(report, default=str).encode()
        status = "200 OK" if report.get("ready") else "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body)))])
        return [body]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a probe every second must not flood the log


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class PrometheusExporter:
    """A running endpoint; `close()` stops its thread (idempotent)."""

    def __init__(self, ctx: _HasStats, port: int, addr: str) -> None:
        from prometheus_client import CollectorRegistry, make_wsgi_app

        class _Collector:
            def collect(self) -> Iterator[Any]:
                return collect(ctx)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector())
        app = health_app(ctx, make_wsgi_app(registry))
        self._server = make_server(addr, port, app, _Server, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="disagg-metrics", daemon=True)
        self._thread.start()
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
    see `.port`), and the readiness probe at /health (200 ready, 503 not, with
    `ctx.readiness()` as JSON). Stopped by `ctx.shutdown()` or `close()`."""
    try:
        exporter = PrometheusExporter(ctx, port, addr)
    except ImportError as e:
        raise ImportError('the Prometheus exporter needs prometheus-client: '
                          'pip install "disagg[metrics]"') from e
    on_shutdown = getattr(ctx, "on_shutdown", None)
    if on_shutdown is not None:
        on_shutdown(exporter.close)
    return exporter
