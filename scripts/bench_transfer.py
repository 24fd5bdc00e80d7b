"""Throughput and latency of disagg against the transports it replaces, moving
the same bytes in the same processes, rounds interleaved, under every kind of
caller.

    python scripts/bench_transfer.py --repeat 3 --json out.json   # the full report
    python scripts/bench_transfer.py --quick                      # every group, small
    python scripts/bench_transfer.py --scenarios sweep,resume --caller wait,spin
    python scripts/bench_transfer.py --plot throughput.png        # needs matplotlib (.[bench])
    python scripts/bench_transfer.py --list                       # what each group runs

Spawns 1 + TP ranks on Gloo over 127.0.0.1 (rank 0 Embedding, the others one
Language instance) and gives every scenario a fresh world in those processes.
Each round all ranks meet at a barrier on a side group, then move the round's
rooms. Times come from CLOCK_MONOTONIC, which every rank on the host shares: a
round starts when the first rank leaves the barrier and a room ends when its
last Language rank has every byte in its destination. Kinds take turns going
first:

  disagg  the library: Sender.send / Receiver.init, once per caller mode, both
          sides alike: "wait" blocks in Sender.wait / Receiver.wait, "spin"
          spins on poll(), "serving" runs 2 ms of pure Python between polls (a
          serving loop's scheduler). Scenarios marked known-length also run
          each caller with "+len": the receiver passes init(seq_len=), so the
          ALLOC carries the room's length;
  raw     torch.distributed isend/irecv of one contiguous tensor per buffer
          (embeddings [n, h] bf16, fill_ids [n] int32, mrope [n, 3] int32) on a
          group of its own, into preallocated tensors, room after room;
  zmq     ZeroMQ PUSH/PULL on 127.0.0.1 (what SGLang's encoder disaggregation
          uses by default): one multipart message per room and Language rank,
          sent with copy=False, each frame copied into a preallocated tensor.

Per scenario and disagg mode: the throughput ratio to raw and to zmq (baseline
time / disagg time, the median of the per-round ratios, with their min-max:
the machine is shared), per-room latency p50/p99 and what it adds to raw's,
and for spin and serving the throughput lost against the blocking caller. A
summary then lists every target with its figure and verdict.
--repeat N runs everything N times in fresh processes: figures pool every
run's rounds, and the min-max of the runs' own medians is shown.

"faults" counts minor page faults per room on a Language rank. disagg's
Language caller hands each round's results back when the round ends
(`ctx.language.recycle`), so later rooms land in touched memory, as the
baselines land in preallocated tensors; with --no-recycle every disagg room
lands in a new result, which the baselines do too with --fresh-destinations
(what a receiver that hands every request its own tensors pays; where glibc
gave the memory back, each 4 KiB page faults on first touch, and on some VMs
that costs far more than on bare metal). The memory group reports the resident memory
growth of every rank between two room counts (target: within 5 %), under the
first caller mode.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_report import plot, print_table, print_targets, summarise_runs, targets
from _bench_scenarios import CALLERS, GROUPS, TARGETS_SET, Scenario, scenarios, select
from _bench_worker import rank_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="groups: " + ", ".join(GROUPS))
    p.add_argument("--scenarios", default=",".join(GROUPS), metavar="GROUPS",
                   help="comma-separated groups (or scenario names, see --list) to run "
                        f"(default: every group; {TARGETS_SET}: only the scenarios the "
                        "targets summary reads, though 'spin loses at most 15 %% in every "
                        "scenario' wants them all)")
    p.add_argument("--quick", action="store_true",
                   help="fewer sizes, rooms and rounds: a short check of every group, "
                        "not a measurement")
    p.add_argument("--rounds", type=int, default=None,
                   help="measured rounds per kind (default 15, --quick 5)")
    p.add_argument("--warmup", type=int, default=None,
                   help="unmeasured rounds first (default 4, --quick 2); round 0 checks bytes")
    p.add_argument("--json", metavar="PATH",
                   help='write {"meta", "scenarios": one record each, "targets"} here')
    p.add_argument("--plot", metavar="PATH", help="PNG of throughput vs size (matplotlib)")
    p.add_argument("--fresh-destinations", action="store_true",
                   help="raw and zmq land each room in newly allocated tensors, as disagg "
                        "does, instead of preallocated touched ones")
    p.add_argument("--no-recycle", action="store_true",
                   help="disagg's Language caller does not hand each round's results back "
                        "(ctx.language.recycle) once the round ends, so every room lands in "
                        "newly allocated memory (the default hands them back, as a serving "
                        "loop does after prefill, as the baselines reuse their destinations)")
    p.add_argument("--caller", default=",".join(CALLERS), metavar="MODES",
                   help="comma-separated disagg caller modes, all measured in the same run "
                        "(default: wait,spin,serving): blocked in wait(), spinning on poll(), "
                        "or a serving loop with 2 ms of Python between polls (the baselines "
                        "always block)")
    p.add_argument("--no-known-len", action="store_true",
                   help="skip the known-length variants (the receiver passing seq_len=)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run everything N times, each in fresh processes (default 1); "
                        "reports the min-max of the runs' medians")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds one scenario may take before its ranks dump stacks and exit")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    groups = [g.strip() for g in args.scenarios.split(",") if g.strip()]
    known = {*GROUPS, TARGETS_SET} | {sc.name for q in (False, True) for sc in scenarios(q)}
    unknown = sorted(set(groups) - known)
    if unknown or not groups:
        p.error(f"--scenarios: unknown {unknown}; groups are {', '.join(GROUPS)}, or "
                f"{TARGETS_SET} (what the targets summary needs) "
                f"(--list names each scenario)")
    args.groups = groups
    callers = [c.strip() for c in args.caller.split(",") if c.strip()]
    bad = sorted(set(callers) - set(CALLERS))
    if bad or not callers or len(set(callers)) != len(callers):
        p.error(f"--caller: {args.caller!r}; give one or more of {', '.join(CALLERS)}, "
                f"comma-separated, each once")
    args.callers = tuple(callers)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    args.rounds = args.rounds if args.rounds is not None else (5 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 4)
    if args.rounds < 1 or args.warmup < 1:
        p.error("--rounds and --warmup must be >= 1 (round 0 is the byte check)")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib, which is not installed: "
                    "pip install 'matplotlib>=3.7' (or pip install -e '.[bench]')")
    return args


def _spawn(scs: list[Scenario], args: argparse.Namespace,
           tmpdir: str) -> list[list[dict | None]]:
    """Run every scenario in one set of rank processes; results per rank."""
    nprocs = max(sc.world for sc in scs)
    pctx = mp.start_processes(rank_main, nprocs=nprocs, join=False, start_method="spawn",
                              args=(scs, args.rounds, args.warmup, tmpdir, args.timeout,
                                    args.fresh_destinations, args.modes, not args.no_recycle))
    budget = args.timeout * len(scs) + 60
    deadline = time.monotonic() + budget
    try:
        while not pctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {budget:.0f}s")
    finally:  # never leave a rank behind (a rank that raised already ended the others)
        for p in pctx.processes:
            if p.is_alive():
                p.kill()
    out = []
    for rank in range(nprocs):
        with open(os.path.join(tmpdir, f"rank{rank}.json")) as f:
            out.append(json.load(f))
    return out


def _commit() -> str:
    """This checkout's commit (with "+dirty" for uncommitted changes), or "unknown"."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so _spawn's cleanup runs
    scs = select(args.groups, args.quick)
    if args.list:
        for sc in scenarios(args.quick):
            print(f"{sc.group:12} {sc.name:24} {sc.rooms:3} x {sc.tokens:5} tokens x "
                  f"{sc.hidden} hidden, TP {sc.tp}, recv_into={sc.recv_into}, "
                  f"alloc {sc.alloc_tokens}, {sc.expected_chunks} chunk(s)/room"
                  + (", one at a time" if sc.sequential else "")
                  + (", also with seq_len known" if sc.known_len else ""))
        return 0
    if not scs:
        print(f"no scenario in {args.scenarios!r} runs {'with' if args.quick else 'without'} "
              f"--quick (see --list)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    args.modes = [sc.modes(args.callers, not args.no_known_len) for sc in scs]
    known = [sc.name for sc, m in zip(scs, args.modes, strict=True) if len(m) > len(args.callers)]
    meta = {"commit": _commit(), "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
            "warmup": args.warmup, "repeat": args.repeat, "callers": list(args.callers),
            "known_len_scenarios": known, "quick": args.quick,
            "baseline_destinations": "fresh" if args.fresh_destinations else "preallocated",
            "disagg_recycle": not args.no_recycle}
    print(f"{len(scs)} scenario(s) in {', '.join(args.groups)}; {args.rounds} rounds "
          f"(+{args.warmup} warm-up) of each kind, interleaved, x {args.repeat} run(s); "
          f"disagg's callers: {', '.join(args.callers)}"
          + (f"; seq_len known too in {', '.join(known)}" if known else "")
          + f"; commit {meta['commit']}, {meta['date']}", flush=True)
    runs = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="disagg-bench-") as tmpdir:
            try:
                runs.append(_spawn(scs, args, tmpdir))
            except Exception as e:  # a rank died: its traceback is already on stderr
                print(f"benchmark failed: {e}", file=sys.stderr)
                return 1
        if args.repeat > 1:
            print(f"run {i + 1}/{args.repeat} done at {time.monotonic() - t0:.0f}s", flush=True)
    records = [summarise_runs(sc, [[r[i] for r in per_rank] for per_rank in runs],
                              args.modes[i]) for i, sc in enumerate(scs)]
    for rec in records:
        rec["baseline_destinations"] = meta["baseline_destinations"]
        rec["disagg_recycle"] = meta["disagg_recycle"]
    print_table(records)
    results = targets(records)
    if args.quick:  # a short check, not a measurement: figures, no verdicts
        for r in results:
            if r["status"] in ("met", "MISSED"):
                r["status"] = "-"
    print_targets(results, args.repeat)
    print(f"total {time.monotonic() - t0:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "scenarios": records, "targets": results}, f, indent=2)
    if args.plot:
        wrote = plot(records, args.plot)
        print(f"plot: {args.plot}" if wrote else "plot: no timed scenario ran, nothing written")
    return 1 if any(r["failures"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
