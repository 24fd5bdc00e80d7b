"""Throughput and latency of disagg against the transports it replaces, moving
the same bytes in the same processes, rounds interleaved.

    python scripts/bench_transfer.py --quick                   # every group, < 1 min
    python scripts/bench_transfer.py --scenarios sweep,resume --rounds 20 --json out.json
    python scripts/bench_transfer.py --plot throughput.png     # needs matplotlib (.[bench])
    python scripts/bench_transfer.py --list                    # what each group runs

Spawns 1 + TP ranks on Gloo over 127.0.0.1 (rank 0 Embedding, the others one
Language instance) and gives every scenario a fresh world in those processes.
Each round all ranks meet at a barrier on a side group, then move the round's
rooms. Times come from CLOCK_MONOTONIC, which every rank on the host shares: a
round starts when the first rank leaves the barrier and a room ends when its
last Language rank has every byte in its destination. Kinds take turns going
first:

  disagg  the library: Sender.send / Receiver.init, waited with Sender.wait and
          Receiver.wait (no spin-polling: on 2 cores it steals the GIL from the
          transfer threads);
  raw     torch.distributed isend/irecv of one contiguous tensor per buffer
          (embeddings [n, h] bf16, fill_ids [n] int32, mrope [n, 3] int32) on a
          group of its own, into preallocated tensors, room after room;
  zmq     ZeroMQ PUSH/PULL on 127.0.0.1 (what SGLang's encoder disaggregation
          uses by default): one multipart message per room and Language rank,
          sent with copy=False, each frame copied into a preallocated tensor.

Figures are medians of the interleaved rounds; d/raw and d/zmq are throughput
ratios (baseline time / disagg time) and "noise" is the min-max of the
per-round ratios, since the machine is shared. "faults" counts minor page
faults per room on a Language rank: disagg lands in a fresh result tensor per
room, which the baselines do too with --fresh-destinations (what a receiver
that hands every request its own tensors pays; on some VMs the first touch of
such memory costs far more than on bare metal, and shows in p99). The memory
group reports the resident memory growth of every rank between two room counts
(target: within 5 %).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time

import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_report import plot, print_table, summarise
from _bench_scenarios import GROUPS, Scenario, scenarios, select
from _bench_worker import rank_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="groups: " + ", ".join(GROUPS))
    p.add_argument("--scenarios", default=",".join(GROUPS), metavar="GROUPS",
                   help="comma-separated groups (or scenario names, see --list) to run "
                        "(default: every group)")
    p.add_argument("--quick", action="store_true",
                   help="fewer sizes, rooms and rounds (under a minute for all groups)")
    p.add_argument("--rounds", type=int, default=None,
                   help="measured rounds per kind (default 15, --quick 5)")
    p.add_argument("--warmup", type=int, default=None,
                   help="unmeasured rounds first (default 4, --quick 2); round 0 checks bytes")
    p.add_argument("--json", metavar="PATH", help="write one record per scenario here")
    p.add_argument("--plot", metavar="PATH", help="PNG of throughput vs size (matplotlib)")
    p.add_argument("--fresh-destinations", action="store_true",
                   help="raw and zmq land each room in newly allocated tensors, as disagg "
                        "does, instead of preallocated touched ones")
    p.add_argument("--caller", choices=("wait", "spin", "serving"), default="wait",
                   help="how disagg's callers wait for a room: blocked in wait(), spinning "
                        "on poll(), or a serving loop with 2 ms of Python between polls "
                        "(the baselines always block)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds one scenario may take before its ranks dump stacks and exit")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    groups = [g.strip() for g in args.scenarios.split(",") if g.strip()]
    known = set(GROUPS) | {sc.name for q in (False, True) for sc in scenarios(q)}
    unknown = sorted(set(groups) - known)
    if unknown or not groups:
        p.error(f"--scenarios: unknown {unknown}; groups are {', '.join(GROUPS)} "
                f"(--list names each scenario)")
    args.groups = groups
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
                                    args.fresh_destinations, args.caller))
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so _spawn's cleanup runs
    scs = select(args.groups, args.quick)
    if args.list:
        for sc in scenarios(args.quick):
            print(f"{sc.group:12} {sc.name:24} {sc.rooms:3} x {sc.tokens:5} tokens x "
                  f"{sc.hidden} hidden, TP {sc.tp}, recv_into={sc.recv_into}, "
                  f"alloc {sc.alloc_tokens}, {sc.expected_chunks} chunk(s)/room"
                  + (", one at a time" if sc.sequential else ""))
        return 0
    if not scs:
        print(f"no scenario in {args.scenarios!r} runs {'with' if args.quick else 'without'} "
              f"--quick (see --list)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    print(f"{len(scs)} scenario(s) in {', '.join(args.groups)}; {args.rounds} rounds "
          f"(+{args.warmup} warm-up) of each kind, interleaved; disagg's callers: "
          f"{args.caller}", flush=True)
    with tempfile.TemporaryDirectory(prefix="disagg-bench-") as tmpdir:
        try:
            per_rank = _spawn(scs, args, tmpdir)
        except Exception as e:  # a rank died: its traceback is already on stderr
            print(f"benchmark failed: {e}", file=sys.stderr)
            return 1
    records = [summarise(sc, [r[i] for r in per_rank]) for i, sc in enumerate(scs)]
    for rec in records:
        rec["baseline_destinations"] = "fresh" if args.fresh_destinations else "preallocated"
        rec["caller"] = args.caller
    print_table(records)
    print(f"total {time.monotonic() - t0:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    if args.plot:
        wrote = plot(records, args.plot)
        print(f"plot: {args.plot}" if wrote else "plot: no timed scenario ran, nothing written")
    return 1 if any(r["failures"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
