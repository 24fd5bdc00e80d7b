"""Stress run (issue 23): 2 Embedding ranks x 2 Language instances x TP 2, aborts from both sides.

A world of 6 on Gloo over 127.0.0.1, one process per rank: ranks 0 and 1 embed, ranks
2,3 are instance 0 and 4,5 instance 1 (recv_into "pool" on ranks 2 and 5, "output" on 3
and 4). It is the soak of tests/test_faults.py, widened: every room gets, from the
seed, an Embedding rank, an instance and 1..300 tokens; about half declare their
length (q.add(seq_len=)), about 5% are sent in two parts (progressive send); 10% are
aborted, half by their Embedding rank (before send / after send / while it streams),
half by the first TP rank of the instance (through a receiver captured from the
engine, a random number of queue steps after add()). Pools are small (Embedding 48,
Language 24 blocks of 16 tokens, first allocation 64 tokens), so resumes are many.

Checked at the end: every room has an outcome on its Embedding rank and on both TP
ranks of its instance; the TP ranks agree, also on q.ready_tokens() and on whether
q.prefix() answers, after every step; rooms not aborted are SUCCESS everywhere;
every SUCCESS and every new q.prefix() is bit-exact; an abort made while the room
was live fails it with the aborting side's reason, unless it raced the last chunk
(SUCCESS everywhere); Embedding SUCCESS with Language FAILED only where the Language
side aborted; Language SUCCESS on both TP ranks implies Embedding SUCCESS; every
FAILED has a reason; failure causes only abort / aborted_by_peer / rejected; pools
whole on every rank. A rank that dies, raises or times out stops the run (the others
report what they have, a dead Language rank its journal: its rooms' states before
its last q.step()). Prints counts per run and "stress: N rooms, K problems"; exits 1
on any problem. Run it under the heavy-job lock (the machine has 2 cores):

    ../shared/heavy timeout 900 python scripts/stress.py --rooms 200 --runs 1
    ../shared/heavy timeout 3600 python scripts/stress.py --rooms 1000 --runs 5 --burner
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_faults as tf  # noqa: E402  (the soak's helpers)
from roomdata import same  # noqa: E402

import disagg  # noqa: E402
from disagg import TransferStatus  # noqa: E402

E, TP, INSTANCES = 2, 2, 2
WORLD = E + TP * INSTANCES
HIDDEN = 32
WINDOW = 32  # rooms in each Language queue at once
CAUSES = {"abort", "aborted_by_peer", "rejected"}  # nothing else may fail
BARRIER_S = 20.0  # a rank done with its rooms waits this long at most for the others
GRACE_S = 45.0  # once a rank died, raised or timed out, the others' time to report


class Room(NamedTuple):
    room: int
    seq: int
    src: int  # Embedding rank
    inst: int  # Language instance
    declared: bool  # q.add(seq_len=seq)
    split: int  # > 0: progressive send, the first part `split` tokens
    side: str | None  # who aborts it: "embedding", "language" or None
    when: Any  # embedding: before_send / after_send / streaming; language: steps after add
    delay: float  # seconds to the streaming abort, or to the second part

    def __str__(self) -> str:
        return (f"room {self.room} (seq {self.seq}, E{self.src} -> ranks {first_tp(self.inst)},"
                f"{first_tp(self.inst) + 1}, {'declared' if self.declared else 'undeclared'}"
                f"{f', in 2 parts at {self.split}' if self.split else ''}"
                f"{f', aborted by {self.side} {self.when}' if self.side else ''})")


def first_tp(inst: int) -> int:
    return E + TP * inst


def cfg_of(rank: int) -> disagg.DisaggConfig:
    return disagg.DisaggConfig(
        num_embedding_ranks=E, language_tp_size=TP, hidden_size=HIDDEN, block_size=16,
        num_blocks=48 if rank < E else 24, default_alloc_tokens=64,
        recv_into="pool" if rank in (2, 5) else "output", backend="gloo",
        bootstrap_timeout=12.0, peer_timeout=5.0)


def make_plan(n: int, seed: int) -> list[Room]:
    rng = random.Random(seed)
    aborted = rng.sample(range(n), n // 10)
    by_embedding = set(aborted[: len(aborted) // 2])
    plan = []
    for i in range(n):
        seq, src, inst = rng.randint(1, 300), rng.randrange(E), rng.randrange(INSTANCES)
        declared, split, side, when, delay = rng.random() < 0.5, 0, None, None, 0.0
        if i in by_embedding:
            side, when = "embedding", rng.choice(["before_send", "after_send", "streaming"])
            delay = rng.uniform(0.0, 0.02)
        elif i in aborted:
            side, when = "language", rng.randint(0, 8)
        if side != "embedding" and seq > 1 and rng.random() < 0.05:
            split, delay = rng.randint(1, seq - 1), rng.uniform(0.0, 0.05)
        plan.append(Room(100_000 + i, seq, src, inst, declared, split, side, when, delay))
    return plan


def part(data: tuple[Any, ...], a: int, b: int) -> tuple[Any, ...]:
    emb, ids, mrope = data
    return emb[a:b], ids[a:b], mrope[:, a:b]


def stopped(run: str) -> bool:
    """The run's stop file: once there, every rank stops and reports what it has."""
    return os.path.exists(f"{run}/stop")


def stop(run: str) -> None:
    Path(f"{run}/stop").touch()


def embedding_rank(ctx: Any, plan: list[Room], deadline: float, run: str) -> dict[str, Any]:
    mine = [p for p in plan if p.src == ctx.rank]
    live: dict[int, list[Any]] = {}  # room -> [sender, data, abort_at, rest_at, split]
    outcome: dict[int, tuple[str, str | None]] = {}
    aborted: dict[int, str] = {}  # room -> its status when abort() was called
    pending: tuple[Any, Any] | None = None  # the next sender, waiting for budget
    i, why = 0, None  # why it stopped before every room ended
    while len(outcome) < len(mine) and why is None:
        while i < len(mine):
            p = mine[i]
            if pending is None:
                s = ctx.embedding.sender(p.room)
                if p.when == "before_send":
                    aborted[p.room] = s.poll().name
                    s.abort(f"stress: embedding abort of {p.room} before send")
                    live[p.room], i = [s, None, None, None, 0], i + 1
                    continue
                pending = (s, tf.make_data(p.room, p.seq, HIDDEN))
            s, data = pending
            try:
                if p.split:
                    s.send(*part(data, 0, p.split), aux=tf.aux_of(p.room), seq_len=p.seq)
                else:
                    s.send(*data, aux=tf.aux_of(p.room))
            except disagg.PoolFull:
                break
            pending, i, now = None, i + 1, time.monotonic()
            if p.when == "after_send":
                aborted[p.room] = s.poll().name
                s.abort(f"stress: embedding abort of {p.room} after send")
            live[p.room] = [s, data, now + p.delay if p.when == "streaming" else None,
                            now + p.delay if p.split else None, p.split]
        now = time.monotonic()
        for room, entry in list(live.items()):
            s, data, abort_at, rest_at, split = entry
            if rest_at is not None and now >= rest_at:
                s.send(*part(data, split, data[0].shape[0]))  # FAILED if aborted meanwhile
                entry[3] = None
            st = s.poll()
            if abort_at is not None and st not in tf.TERMINAL and (
                    now >= abort_at or st is TransferStatus.TRANSFERRING):
                aborted[room] = st.name
                s.abort(f"stress: embedding abort of {room} while live")
                entry[2] = None
            elif st in tf.TERMINAL and entry[3] is None:
                outcome[room] = (st.name, None if s.failure is None else str(s.failure))
                del live[room]
        if now > deadline:
            why = (f"timed out: {len(outcome)} of {len(mine)} rooms ended; live: "
                   f"{ {r: e[0].poll().name for r, e in list(live.items())[:10]} }")
        elif stopped(run):
            why = "stopped"
        time.sleep(tf.POLL_S)
    return {"outcome": outcome, "aborted": aborted, "stopped": why}


def prefix_mismatches(res: Any, room: int, seq: int, n: int) -> list[str]:
    """What differs, bit for bit, between q.prefix(room) and the first n tokens sent."""
    want = part(tf.make_data(room, seq, HIDDEN), 0, n)
    bad = [name for name, w in zip(("embeddings", "fill_ids", "mrope_positions"), want,
                                   strict=True) if not same(getattr(res, name), w)]
    bad += [f"aux {tuple(res.aux)}"] if tuple(res.aux) != tf.aux_of(room) else []
    return [f"room {room}: q.prefix() of {n} tokens differs: {', '.join(bad)}"] if bad else []


def language_rank(ctx: Any, plan: list[Room], deadline: float, run: str) -> dict[str, Any]:
    inst = (ctx.rank - E) // TP
    mine = [p for p in plan if p.inst == inst]
    seq_of = {p.room: p.seq for p in mine}
    # the receivers the queue makes: the first TP rank aborts through them on its own
    # (the queue makes the other agree), and every rank journals their states
    rx: dict[int, Any] = {}
    make = ctx.language.engine.receiver

    def capture(room: int, src_rank: int) -> Any:
        rx[room] = make(room, src_rank)
        return rx[room]

    ctx.language.engine.receiver = capture
    to_abort = ({p.room: p.when for p in mine if p.side == "language"}
                if ctx.rank == first_tp(inst) else {})
    q = ctx.language.queue()
    added: dict[int, int] = {}  # room -> step of add()
    results: dict[int, tuple[str, Any]] = {}
    aborted: dict[int, str] = {}  # room -> its status when abort() was called
    queued: set[int] = set()
    # after each step, (room, ready_tokens, whether q.prefix() answered) for every queued
    # room with tokens ready: the same on both TP ranks
    views: list[list[tuple[int, int, bool]]] = []
    refused: dict[int, str] = {}  # room -> why q.prefix() first refused
    checked: dict[int, int] = {}  # room -> ready_tokens at its last bit-exact check
    bad_prefix: list[str] = []
    step, i, why = 0, 0, None
    while len(results) < len(mine) and why is None:
        while i < len(mine) and len(q) < WINDOW:
            p = mine[i]
            q.add(p.room, p.src, seq_len=p.seq if p.declared else None)
            added[p.room], i = step, i + 1
            queued.add(p.room)
        for room, when in list(to_abort.items()):
            if room in results:
                del to_abort[room]
            elif room in added and step - added[room] >= when:
                aborted[room] = rx[room].poll().name
                rx[room].abort(f"stress: language abort of {room} at step {step - added[room]}")
                del to_abort[room]
        states = {r: rx[r].poll() for r in sorted(queued)}
        lines = [f"{r} {st.name} received {rx[r].progress} needs_resume {rx[r].needs_resume}"
                 f"{' ABORTED here' if r in aborted else ''}" for r, st in states.items()
                 if st is not TransferStatus.BOOTSTRAPPING or r in aborted]
        Path(f"{run}/journal.{ctx.rank}").write_text(
            f"before q.step() #{step + 1} ({len(states) - len(lines)} more rooms "
            f"BOOTSTRAPPING):\n" + "\n".join(lines))
        try:
            done, failed = q.step()
        except disagg.LockstepError:
            if not stopped(run):  # else the other TP rank stopped first
                raise
            break
        step += 1
        for room, res in done:
            results[room] = ("SUCCESS", tf.mismatches(res, room, seq_of[room], HIDDEN))
        for room, reason in failed:
            results[room] = ("FAILED", str(reason) if reason else reason)
        queued -= set(results)
        view = []
        for room in sorted(queued):
            if n := q.ready_tokens(room):
                try:
                    res = q.prefix(room)
                except disagg.DisaggError as err:
                    view.append((room, n, False))
                    refused.setdefault(room, f"after q.step() #{step}: {err}")
                    continue
                view.append((room, n, True))
                if checked.get(room) != n:
                    checked[room] = n
                    bad_prefix += prefix_mismatches(res, room, seq_of[room], n)
        views.append(view)
        if time.monotonic() > deadline:
            why = (f"timed out: {len(results)} of {len(mine)} rooms ended, {len(q)} queued: "
                   f"{sorted(queued)[:10]}")
        elif stopped(run):
            why = "stopped"
        time.sleep(0.0002)
    return {"results": results, "aborted": aborted, "steps": step, "views": views,
            "refused": refused, "bad_prefix": bad_prefix,
            "stopped": why or ("stopped" if len(results) < len(mine) else None)}


def rank_main(rank: int, run: str, n: int, seed: int, timeout: float) -> dict[str, Any]:
    ctx = disagg.init(cfg_of(rank), rank=rank, world_size=WORLD,
                      init_method=f"file://{run}/init")
    sync = tf.Sync(f"stress/{n}/{seed}")
    t0 = time.monotonic()
    try:
        out = (embedding_rank if rank < E else language_rank)(
            ctx, make_plan(n, seed), t0 + timeout, run)
        out["elapsed_s"] = time.monotonic() - t0
        if out["stopped"]:  # a timeout here, or another rank's trouble: report what it has
            stop(run)
            out["late"], out["whole"] = [], tf.pool_state(ctx)
        else:  # wait a bounded time for the others, then the pool must be whole
            sync.put(f"done/{rank}")
            tf.wait_quietly(lambda: stopped(run) or all(sync.has(f"done/{r}")
                                                         for r in range(WORLD)), BARRIER_S)
            out["late"] = [r for r in range(WORLD) if not sync.has(f"done/{r}")]
            out["whole"] = tf.pool_settled(ctx, 10.0)
        stats = ctx.stats()
        out["causes"] = tf.causes(ctx)
        out["counters"] = {k: stats[k] for k in ("chunks", "resumes")}
    finally:
        ctx.shutdown()
    return out


def _entry(rank: int, run: str, args: tuple, out: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        out.put((rank, "ok", rank_main(rank, run, *args)))
    except BaseException:
        stop(run)
        out.put((rank, "error", traceback.format_exc()))


def spawn_world(args: tuple, timeout: float) -> tuple[dict[int, Any], list[str]]:
    """Every rank's result, and a problem for each rank that died, raised or timed out."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    run = tempfile.mkdtemp(prefix="disagg-stress-")
    procs = [ctx.Process(target=_entry, args=(r, run, args, out), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < WORLD and time.monotonic() < deadline:
            try:
                rank, kind, value = out.get(timeout=0.5)
                got[rank] = (kind, value)
                continue
            except queue.Empty:
                silent = [r for r, p in enumerate(procs) if r not in got and not p.is_alive()]
            if silent:  # died without a word
                stop(run)
                if len(got) + len(silent) == WORLD:
                    break
            if stopped(run):
                deadline = min(deadline, time.monotonic() + GRACE_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        journals = {r: Path(f"{run}/journal.{r}").read_text() for r in range(WORLD)
                    if r not in got and os.path.exists(f"{run}/journal.{r}")}
        shutil.rmtree(run, ignore_errors=True)
    problems = []
    for r, p in enumerate(procs):
        if r not in got:
            problems.append(f"rank {r}: no result (exit code {p.exitcode}); its journal, "
                            f"{journals.get(r, 'none')}")
        elif got[r][0] != "ok":
            tail = "\n".join(got[r][1].rstrip().splitlines()[-6:])
            problems.append(f"rank {r} raised:\n{tail}")
        elif got[r][1]["stopped"] not in (None, "stopped"):
            problems.append(f"rank {r}: {got[r][1]['stopped']}")
    return {r: v for r, (k, v) in got.items() if k == "ok"}, problems


def check(plan: list[Room], outs: dict[int, Any]) -> tuple[dict[str, int], list[str], list[str]]:
    """Counts of outcomes, problems, and the rooms not aborted that a cut run failed."""
    counts = dict.fromkeys(("SUCCESS", "FAILED by embedding abort", "FAILED by language abort",
                            "aborts too late", "FAILED not aborted", "unchecked"), 0)
    problems: list[str] = []
    caught: list[str] = []
    live_at_abort = (None, "SUCCESS", "FAILED")  # else the abort came too late to matter
    # a run cut short (a rank died, raised or timed out: a problem of its own) leaves
    # rooms unfinished and pools not whole: only the rooms that ended are judged
    cut = len(outs) < WORLD or any(o["stopped"] for o in outs.values())
    for p in plan:
        a, b = first_tp(p.inst), first_tp(p.inst) + 1
        oe = outs.get(p.src, {}).get("outcome", {}).get(p.room)
        oa, ob = (outs.get(r, {}).get("results", {}).get(p.room) for r in (a, b))
        if cut and None in (oe, oa, ob):
            counts["unchecked"] += 1
            if p.side is None and any(o and o[0] == "FAILED" for o in (oe, oa, ob)):
                caught.append(f"{p}: embedding {oe}, language {oa} / {ob}")
            continue
        if oe is None or oa is None or ob is None:
            problems.append(f"{p}: no outcome: embedding {oe}, language {oa} / {ob}")
            continue
        every = (oe[0], oa[0], ob[0]) == ("SUCCESS",) * 3
        counts[("aborts too late" if p.side else "SUCCESS") if every else
               (f"FAILED by {p.side} abort" if p.side else "FAILED not aborted")] += 1
        if oa[0] != ob[0]:
            problems.append(f"{p}: TP ranks disagree: {oa} vs {ob}")
        for who, o in ((f"embedding rank {p.src}", oe), (f"language rank {a}", oa),
                       (f"language rank {b}", ob)):
            if o[0] == "SUCCESS" and o[1]:
                problems.append(f"{p}: CORRUPT on {who}: {o[1]}")
            if o[0] == "FAILED" and not o[1]:
                problems.append(f"{p}: FAILED on {who} without a reason")
        if p.side is None and not every:
            problems.append(f"{p}: not aborted, but embedding {oe}, language {oa} / {ob}")
        # an abort racing the last chunk to every TP rank is decided by that chunk
        if (p.side == "embedding" and outs[p.src]["aborted"].get(p.room) not in live_at_abort
                and not every and (oe[0] != "FAILED" or f"aborted on embedding rank {p.src}"
                                   not in (oe[1] or ""))):
            problems.append(f"{p}: aborted by its embedding rank, there {oe}")
        if (p.side == "language" and outs[a]["aborted"].get(p.room) not in live_at_abort
                and (oa[0] != "FAILED" or f"aborted on language rank {a}" not in (oa[1] or ""))):
            problems.append(f"{p}: aborted by language rank {a}, there {oa}")
        if oe[0] == "SUCCESS" and "FAILED" in (oa[0], ob[0]) and p.side != "language":
            problems.append(f"{p}: embedding SUCCESS, language {oa} / {ob}")
        if oa[0] == ob[0] == "SUCCESS" and oe[0] != "SUCCESS":
            problems.append(f"{p}: received whole on both TP ranks, embedding {oe}")
    for a in (first_tp(k) for k in range(INSTANCES)):
        va, vb = (outs.get(r, {}).get("views", []) for r in (a, a + 1))
        for k in [k for k, (x, y) in enumerate(zip(va, vb, strict=False)) if x != y][:5]:
            x, y = set(va[k]), set(vb[k])
            problems.append(
                f"ranks {a},{a + 1}: q.ready_tokens/q.prefix disagree after q.step() #{k + 1}: "
                f"(room, ready, prefix given) only on {a}: {sorted(x - y)}; only on {a + 1}: "
                f"{sorted(y - x)}; " + "; ".join(
                    f"rank {r} refused room {room} {outs[r]['refused'][room]}"
                    for room in sorted({v[0] for v in x ^ y}) for r in (a, a + 1)
                    if room in outs[r]["refused"]))
    for r in range(E, WORLD):
        problems += outs.get(r, {}).get("bad_prefix", [])
    for r, o in sorted(outs.items()) if not cut else ():
        w = o["whole"]
        if w["pool_free_blocks"] != w["pool_total_blocks"] or w["rooms_live"]:
            problems.append(f"rank {r}: LEAK: {w}")
        if o["late"]:
            problems.append(f"rank {r}: ranks {o['late']} not done {BARRIER_S:g}s after it")
        if set(o["causes"]) - CAUSES:
            problems.append(f"rank {r}: unexpected failure causes {o['causes']}")
    return counts, problems, caught


def one_run(n: int, seed: int, timeout: float, burner: bool) -> int:
    """One world, checked and reported; the number of problems."""
    burn = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if burner else None
    t0 = time.monotonic()
    try:
        outs, problems = spawn_world((n, seed, timeout), timeout + 60.0)
    finally:
        if burn is not None:
            burn.kill()
            burn.wait(10)
    wall = time.monotonic() - t0
    plan = make_plan(n, seed)
    counts, more, caught = check(plan, outs)
    problems += more
    print(f"run seed {seed}: {n} rooms ({sum(p.declared for p in plan)} declared, "
          f"{sum(p.split > 0 for p in plan)} in 2 parts, {sum(p.side is not None for p in plan)} "
          f"aborted), {wall:.1f}s wall{' with a CPU burner' if burner else ''}")
    print("  outcomes: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for r, o in sorted(outs.items()):
        steps = (f", {o['steps']} steps, q.prefix refused for {len(o['refused'])} rooms"
                 if "steps" in o else "")
        print(f"  rank {r}: {o['elapsed_s']:.1f}s{steps}, {o['counters']}, "
              f"failures {o['causes']}")
    for line in caught[:10]:
        print(f"  cut short: {line}")
    for line in problems[:40]:
        print("  PROBLEM " + line.replace("\n", "\n    "))
    if len(problems) > 40:
        print(f"  ... and {len(problems) - 40} more problems")
    print(f"run seed {seed}: {n} rooms, {len(problems)} problems", flush=True)
    return len(problems)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rooms", type=int, default=1000, help="rooms per run (default 1000)")
    ap.add_argument("--seed", type=int, default=23, help="seed of the first run (default 23)")
    ap.add_argument("--runs", type=int, default=1, help="runs, seeds S..S+R-1 (default 1)")
    ap.add_argument("--burner", action="store_true", help="a CPU busy loop beside each run")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run (default 600)")
    args = ap.parse_args()
    problems = sum(one_run(args.rooms, args.seed + k, args.timeout, args.burner)
                   for k in range(args.runs))
    print(f"stress: {args.rooms * args.runs} rooms, {problems} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
