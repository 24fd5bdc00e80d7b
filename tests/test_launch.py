"""The README's demo command, run as a user would: torchrun, real ranks on Gloo.

Slowest layer (each run starts fresh interpreters), so settings are small.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--rooms", "6", "--hidden-size", "64", "--min-tokens", "1", "--max-tokens", "300",
         "--block-size", "16", "--num-blocks", "32", "--default-alloc-tokens", "64",
         "--timeout", "60"]


def torchrun(nproc: int, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", "-m", module, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)


@pytest.mark.parametrize(("nproc", "extra"), [
    (2, []),
    (3, ["--language-tp-size", "2", "--recv-into", "pool"]),
], ids=["e1-l1", "e1-tp2-pool"])
def test_transfer_demo_runs_and_verifies(nproc: int, extra: list[str]) -> None:
    p = torchrun(nproc, "launch.transfer", *SMALL, *extra)
    assert p.returncode == 0, p.stdout + p.stderr
    # ranks share stdout, so their lines may interleave: count reports, not lines
    assert p.stdout.count("] OK:") == nproc, p.stdout + p.stderr
    assert "FAILED" not in p.stdout, p.stdout + p.stderr


def test_transfer_demo_help_documents_flags() -> None:
    p = subprocess.run([sys.executable, "-m", "launch.transfer", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    for flag in ("--rooms", "--hidden-size", "--block-size", "--default-alloc-tokens",
                 "--language-tp-size", "--num-embedding-ranks", "--recv-into", "--seed"):
        assert flag in p.stdout


def test_progressive_example_runs_bit_exact() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "examples/progressive.py", "--requests", "2", "--images", "3", "--tokens-per-image",
         "32", "--encode-ms", "10", "--hidden-size", "64", "--timeout", "60"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 requests bit-exact" in p.stdout, p.stdout + p.stderr
    # prefill started before some request's last image had arrived
    assert " 0 prefill chunks ran before" not in p.stdout, p.stdout


def test_arrivals_example_admits_requests_as_they_come_on_a_tp_2_instance() -> None:
    """Issue 27: admission as a rank-agreed decision (TP rank 0 broadcasts what
    arrived), every room bit-exact on both TP ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
         "examples/arrivals.py", "--requests", "20", "--timeout", "60"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("OK arrivals: 20 requests admitted as they came, 20 bit-exact") == 2, \
        p.stdout + p.stderr


def test_launch_is_installed_so_the_demo_runs_from_anywhere(tmp_path: Path) -> None:
    """Issue 27: `python -m launch.demo` from another directory."""
    p = subprocess.run([sys.executable, "-m", "launch.demo", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_progressive_benchmark_reports_both_modes() -> None:
    p = subprocess.run(
        [sys.executable, "scripts/bench_progressive.py", "--rounds", "2", "--images", "2",
         "--tokens-per-image", "32", "--encode-ms", "20", "--hidden-size", "64"],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "progressive" in p.stdout and "whole" in p.stdout and "earlier by" in p.stdout


def test_items_benchmark_reports_every_mode_with_the_bytes_and_encodes_it_saved() -> None:
    p = subprocess.run(
        [sys.executable, "scripts/bench_items.py", "--requests", "3", "--images", "2",
         "--tokens-per-image", "16", "--hidden-size", "64", "--encode-ms", "5",
         "--rates", "0", "0.9", "--callers", "serving", "wait"],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    for caller, rate in [(c, r) for c in ("serving", "wait") for r in ("0%", "90%")]:
        at = lines.index(f"{caller} caller, reuse {rate}:")
        rows = {ln.split()[0]: ln for ln in lines[at + 1:at + 4]}
        assert set(rows) == {"plain", "items-1", "items-2"}, p.stdout
        encoded = {m: int(r.split("encoded")[1].split()[0]) for m, r in rows.items()}
        assert encoded["plain"] == 6, p.stdout  # every image of every request
        if rate == "0%":
            assert encoded["items-1"] == encoded["items-2"] == 6, p.stdout
        else:  # the seeded stream repeats images: those are neither encoded nor sent
            assert encoded["items-1"] == encoded["items-2"] < 6, p.stdout


def test_step_benchmark_reports_step_against_its_all_reduce() -> None:
    p = subprocess.run(
        [sys.executable, "scripts/bench_step.py", "--tp", "2", "--rooms", "1", "5",
         "--steps", "20"], cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "TP 2,    1 rooms: step" in p.stdout and "TP 2,    5 rooms: step" in p.stdout
    assert p.stdout.count("all-reduce") == 3, p.stdout


def test_scale_benchmark_measures_a_small_world_and_models_the_fleets() -> None:
    # one encoder at max_pairs 1 serving two Language ranks: pairs made on demand,
    # the encoder asking for the idle one to close (both sides at their cap at
    # once: tests/test_pairs_gloo.py and issue 28's note)
    p = subprocess.run([sys.executable, "scripts/bench_scale.py", "--embedding", "1",
                        "--language", "2", "--max-pairs", "1", "--store-seconds", "0.1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "store, one client (measured)" in p.stdout and "multi_get" in p.stdout
    # pairs on demand under a cap of 1: none at start, at most one live, made again
    assert "full mesh (measured)" in p.stdout and "pairs at start 0" in p.stdout, p.stdout
    assert "pairs at start 2" not in p.stdout and "pairs at start 1" not in p.stdout
    assert "embedding pairs live/rank max 1" in p.stdout, p.stdout
    assert "language  pairs live/rank max 1" in p.stdout, p.stdout
    for fleet in ("8 x 32", "32 x 128", "128 x 1024"):
        assert fleet in p.stdout, p.stdout
    assert "met by the model" in p.stdout and "NOT met" not in p.stdout, p.stdout


def test_wrong_process_count_is_said_once_briefly() -> None:
    """Issue 18: a world that does not fit the config used to print the same
    error in 80-130 lines of per-rank tracebacks; now one line, once."""
    p = torchrun(3, "launch.transfer", *SMALL, "--num-embedding-ranks", "2",
                 "--language-tp-size", "2")
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert out.count("launch.transfer: cannot start: world_size=3 does not fit") == 1, out
    assert "Traceback" not in out.split("ChildFailedError")[0].split("cannot start")[0], out
