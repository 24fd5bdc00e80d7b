"""scripts/bench_transfer.py runs end to end and documents its flags.

Not a speed test: throughput is what the benchmark reports, never what a test
asserts. These only check that a short run completes, checks its bytes, and
writes a well-formed record per scenario."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_transfer.py"
FLAGS = ("--scenarios", "--quick", "--rounds", "--warmup", "--json", "--plot", "--timeout",
         "--fresh-destinations", "--list", "--help")


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=SCRIPT.parent.parent)


def _load():
    """The script as a module (it puts scripts/ on sys.path for its helpers)."""
    spec = importlib.util.spec_from_file_location("bench_transfer", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_a_record_per_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    p = _run("--quick", "--scenarios", "latency", "--rounds", "2", "--json", str(out),
             timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    records = json.loads(out.read_text())
    names = ["latency-64tok", "latency-64tok-alloc-first"]
    assert [r["name"] for r in records] == names
    for rec in records:
        assert rec["failures"] == 0
        assert rec["rounds"] == 2 and rec["rooms"] >= 1 and rec["bytes"] > 0
        assert rec["chunks_per_room"] >= 1
        for kind in ("disagg", "raw", "zmq"):
            k = rec[kind]
            for field in ("median_s", "min_s", "max_s", "gbps", "p50_ms", "p99_ms"):
                assert k[field] > 0, (kind, field, k[field])
            assert len(k["rounds_s"]) == 2
            assert k["min_s"] <= k["median_s"] <= k["max_s"]
        for base in ("raw", "zmq"):
            assert rec[f"ratio_disagg_{base}"] > 0
            lo, hi = rec[f"noise_disagg_{base}"]
            assert 0 < lo <= hi
    for name in names:
        assert name in p.stdout  # the table
    assert all(r["baseline_destinations"] == "preallocated" for r in records)


def test_fresh_destinations_land_and_check_new_tensors(tmp_path: Path) -> None:
    """The baselines' byte check runs on the freshly allocated tensors too."""
    out = tmp_path / "bench.json"
    p = _run("--quick", "--scenarios", "latency-64tok", "--rounds", "1",
             "--fresh-destinations", "--json", str(out), timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    [rec] = json.loads(out.read_text())
    assert rec["baseline_destinations"] == "fresh" and rec["failures"] == 0
    assert rec["raw"]["gbps"] > 0 and rec["zmq"]["gbps"] > 0
    assert "fresh tensors per room" in p.stdout


def test_help_lists_every_flag() -> None:
    p = _run("--help", timeout=60)
    assert p.returncode == 0, p.stderr
    declared = {o for a in _load().build_parser()._actions for o in a.option_strings
                if o.startswith("--")}
    assert set(FLAGS) <= declared
    for flag in declared:
        assert flag in p.stdout, f"{flag} missing from --help"


def test_unknown_group_is_a_clear_error() -> None:
    p = _run("--scenarios", "nope", timeout=60)
    assert p.returncode == 2
    assert "unknown" in p.stderr and "sweep" in p.stderr


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys) -> None:
    mod = _load()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    try:
        mod.parse_args(["--plot", "out.png"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("--plot without matplotlib was accepted")
    assert "pip install" in capsys.readouterr().err


@pytest.mark.parametrize("caller", ["spin", "serving"])
def test_callers_that_spin_or_serve_complete_and_are_recorded(tmp_path: Path, caller: str) -> None:
    """Issue 15's caller modes: disagg's callers spin on poll() or run a serving
    loop (2 ms of Python between polls) instead of blocking in wait()."""
    out = tmp_path / "bench.json"
    p = _run("--quick", "--scenarios", "latency-64tok", "--rounds", "1", "--caller", caller,
             "--json", str(out), timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    [rec] = json.loads(out.read_text())
    assert rec["caller"] == caller and rec["failures"] == 0 and rec["disagg"]["gbps"] > 0
    assert f"disagg's callers: {caller}" in p.stdout
