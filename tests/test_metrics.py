"""The optional Prometheus exporter: scraped over HTTP on 127.0.0.1, in-process
(a stand-in context with known stats; the stats themselves are tested on real
ranks in test_serving.py)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from disagg.metrics import serve_prometheus

pytestmark = pytest.mark.timeout(30)


class FakeContext:
    rank = 3
    role = "language"

    def __init__(self) -> None:
        self.hooks: list = []
        self.bytes = 1000

    def stats(self) -> dict[str, object]:
        return {"bytes_sent": 0, "bytes_received": self.bytes, "chunks": 4, "resumes": 1,
                "failures": 2, "auto_alloc_resumes_avoided": -3, "pool_total_blocks": 16, "pool_free_blocks": 12, "rooms_live": 1,
                "pairs_live": 2, "pairs_created": 5, "pairs_closed": 3,
                "failures_by_cause": {"abort": 1, "peer_lost": 1},
                "rooms_live_by_peer": {0: 1},
                "latency_s": {"recv_total_s": {"count": 4.0, "p50": 0.25, "p99": 0.5,
                                               "max": 0.75}}}

    def on_shutdown(self, fn) -> None:
        self.hooks.append(fn)


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_scrape_reads_stats_afresh_and_shutdown_stops_the_server() -> None:
    ctx = FakeContext()
    threads_before = threading.active_count()
    exporter = serve_prometheus(ctx, port=0)
    base = {"rank": "3", "role": "language"}

    def key(name: str, **labels: str) -> tuple[str, frozenset]:
        return name, frozenset({**base, **labels}.items())

    try:
        m = scrape(exporter.port)
        assert m[key("disagg_bytes_received_total")] == 1000
        assert m[key("disagg_pool_free_blocks")] == 12
        assert m[key("disagg_pairs_live")] == 2 and m[key("disagg_pairs_created_total")] == 5
        assert m[key("disagg_pairs_closed_total")] == 3
        assert m[key("disagg_failures_by_cause_total", cause="peer_lost")] == 1
        assert m[key("disagg_rooms_live_by_peer", peer="0")] == 1
        assert m[key("disagg_latency_seconds", stage="recv_total_s", quantile="0.99")] == 0.5
        assert m[key("disagg_auto_alloc_resumes_avoided")] == -3  # a gauge: it may go down
        ctx.bytes = 5000  # every scrape reads ctx.stats() again
        assert scrape(exporter.port)[key("disagg_bytes_received_total")] == 5000
    finally:
        assert len(ctx.hooks) == 1
        ctx.hooks[0]()  # what ctx.shutdown() runs
    assert threading.active_count() == threads_before
    with pytest.raises(OSError):
        scrape(exporter.port)
    exporter.close()  # idempotent


class ProbedContext(FakeContext):
    """Also health() and readiness(), as a real context has."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: str | None = None

    def health(self) -> dict[int, dict[str, object]]:
        return {0: {"alive": self.lost is None, "last_heard_s": 0.1, "rooms_live": 1,
                    "pair": "ok" if self.lost is None else f"lost: {self.lost}"},
                1: {"alive": True, "last_heard_s": 0.2, "rooms_live": 0, "pair": "ok"}}

    def readiness(self) -> dict[str, object]:
        ready = self.lost is None
        return {"ready": ready, "reason": "2 peer(s) alive" if ready else "instance lost"}


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_route_answers_200_or_503_and_peers_have_gauges() -> None:
    ctx = ProbedContext()
    exporter = serve_prometheus(ctx, port=0)
    base = {"rank": "3", "role": "language"}
    try:
        status, body = get(exporter.port, "/health")
        assert status == 200 and json.loads(body)["ready"] is True
        m = scrape(exporter.port)
        assert m[("disagg_peer_alive", frozenset({**base, "peer": "0"}.items()))] == 1
        assert m[("disagg_ready", frozenset(base.items()))] == 1
        ctx.lost = "heartbeats stopped"
        status, body = get(exporter.port, "/health")
        assert status == 503 and json.loads(body)["reason"] == "instance lost"
        m = scrape(exporter.port)
        assert m[("disagg_peer_alive", frozenset({**base, "peer": "0"}.items()))] == 0
        assert m[("disagg_pair_up", frozenset({**base, "peer": "0"}.items()))] == 0
        assert m[("disagg_pair_up", frozenset({**base, "peer": "1"}.items()))] == 1
        assert m[("disagg_ready", frozenset(base.items()))] == 0
    finally:
        exporter.close()
