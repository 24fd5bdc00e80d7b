"""Separate jobs on one box: an encoder job and a Language job (TP 2) meet
through a rendezvous store; the encoder is SIGKILLed mid-run and restarted
under the same name while the Language job keeps serving.

    python -m launch.jobs_demo
    python -m launch.jobs_demo --rooms 48 --restart-after 16 --language-tp-size 1

On 127.0.0.1 only, it starts what docs/deployment.md runs on real nodes:
`python -m launch.rendezvous`, the Language job (`torchrun --standalone
--nproc-per-node T -m launch.jobs_demo --as language`) and the encoder job
(`python -m launch.jobs_demo --as embedding`: one rank, no world). Language
rank 0 routes: it picks the encoder by name from `ctx.peers()` and tells its TP
peers (a broadcast in its own world) and the encoder (a key under `jobs_demo/`
in the store, standing in for a router's RPC) which room comes next. Each TP
rank regenerates every room from (seed, room) and checks every byte. Exit code
1 on a mismatch, a failed room not addressed to the killed encoder, a missing
result, or a child that fails.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist

import disagg
from disagg import DisaggConfig, PoolFull, TransferStatus
from disagg.store import connect_store
from launch.transfer import room_tensors

NS = "jobs_demo"  # the demo's own keys in the rendezvous store
NAME = "encoder"  # the encoder job's name: its restart joins under it again
ENDED = (TransferStatus.SUCCESS, TransferStatus.FAILED)
SEED, MIN_TOKENS, MAX_TOKENS, HIDDEN = 0, 16, 256, 256
MAX_IN_FLIGHT, ENCODE_S = 4, 0.02  # rooms queued at once; the encoder's stand-in work


def say(text: str) -> None:
    sys.stdout.write(text + "\n")  # one write: processes share the terminal
    sys.stdout.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rooms", type=int, default=24, help="requests (rooms) to move")
    p.add_argument("--port", type=int, default=0, help="rendezvous store port (0: a free one)")
    p.add_argument("--language-tp-size", type=int, default=2, help="ranks of the Language job")
    p.add_argument("--restart-after", type=int, default=8,
                   help="SIGKILL and restart the encoder once this many rooms ended (0: never)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole run")
    p.add_argument("--as", dest="side", choices=("embedding", "language"),
                   help="run one job's processes against a running rendezvous at --port "
                        "(the driver starts them; by hand: docs/deployment.md)")
    args = p.parse_args(argv)
    if min(args.rooms, args.language_tp_size) < 1 or args.restart_after < 0:
        p.error("need --rooms, --language-tp-size >= 1 and --restart-after >= 0")
    return args


def config(args: argparse.Namespace) -> DisaggConfig:
    return DisaggConfig(language_tp_size=args.language_tp_size, hidden_size=HIDDEN,
                        block_size=32, num_blocks=64, default_alloc_tokens=MAX_TOKENS,
                        backend="gloo", host="127.0.0.1", bootstrap_timeout=30.0,
                        peer_timeout=5.0)


def run_embedding(args: argparse.Namespace) -> int:
    """One Embedding rank: send each room the router puts in its inbox."""
    rdzv = f"tcp://127.0.0.1:{args.port}"
    store = connect_store(rdzv, 30.0)
    ctx = disagg.join(config(args), rdzv, role="embedding", name=NAME)
    store.set(f"{NS}/id/{os.getpid()}", str(ctx.rank))
    live: list[tuple[disagg.Sender, tuple[torch.Tensor, ...]]] = []  # kept until ended
    k, deadline = 0, time.monotonic() + args.timeout
    try:
        while not store.check([f"{NS}/stop"]):
            live = [(s, t) for s, t in live if s.poll() not in ENDED]
            if time.monotonic() > deadline:
                return 1
            if not store.check([f"{NS}/inbox/{ctx.rank}/{k}"]):
                time.sleep(0.005)
                continue
            room = int(store.get(f"{NS}/inbox/{ctx.rank}/{k}"))
            k += 1
            emb, ids, pos, aux = room_tensors(SEED, room, MIN_TOKENS, MAX_TOKENS, HIDDEN)
            time.sleep(ENCODE_S)
            s = ctx.embedding.sender(room)
            while True:
                try:
                    s.send(emb, ids, pos, aux=aux)
                    break
                except PoolFull:  # nothing changed: send again once budget frees up
                    time.sleep(0.005)
            live.append((s, (emb, ids, pos)))
        for s, _ in live:
            s.wait(5.0)
    finally:
        ctx.shutdown()
    return 0


def check(res: disagg.EmbeddingResult, room: int) -> bool:
    emb, ids, pos, aux = room_tensors(SEED, room, MIN_TOKENS, MAX_TOKENS, HIDDEN)
    return (torch.equal(res.embeddings.view(torch.int16), emb.view(torch.int16))
            and torch.equal(res.fill_ids, ids) and res.mrope_positions is not None
            and torch.equal(res.mrope_positions, pos) and res.aux == aux)


def run_language(args: argparse.Namespace) -> int:
    """One TP rank of the Language job; rank 0 also routes."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rdzv, tp_rank = f"tcp://127.0.0.1:{args.port}", dist.get_rank()
    store = connect_store(rdzv, 30.0)
    ctx = disagg.join(config(args), rdzv, role="language", name=f"llm-{tp_rank}")
    q = ctx.language.queue()
    posted: dict[int, int] = {}  # encoder id -> rooms put in its inbox
    src_of: dict[int, int] = {}
    next_room, rc, deadline = 0, 0, time.monotonic() + args.timeout
    try:
        while True:
            decision = torch.tensor([-1, -1])  # [room, src], -1: nothing to add now
            if tp_rank == 0:
                ids = [i for i, name in ctx.peers().items() if name == NAME]
                if next_room == args.rooms and not len(q):
                    decision[0] = -2  # all done
                elif time.monotonic() > deadline:
                    decision[0] = -3
                elif next_room < args.rooms and len(q) < MAX_IN_FLIGHT and ids:
                    decision = torch.tensor([next_room, max(ids)])  # the newest of that name
            dist.broadcast(decision, 0)  # same adds, same order on every TP rank
            if decision[0] >= 0:  # peers() is each rank's own: add once all TP ranks list it
                listed = torch.tensor([int(int(decision[1]) in ctx.peers())])
                dist.all_reduce(listed, op=dist.ReduceOp.MIN)
                if not int(listed):
                    decision[0] = -1  # not yet: rank 0 proposes it again next time
            room, src = decision.tolist()
            if room < -1:  # -2: every room ended (the demo's encoder may exit); -3: out of time
                rc = int(room == -3)
                if tp_rank == 0 and not rc:
                    store.set(f"{NS}/stop", "1")
                break
            if room >= 0:
                if tp_rank == 0:
                    n = posted[src] = posted.get(src, 0) + 1
                    store.set(f"{NS}/inbox/{src}/{n - 1}", str(room))
                    if n == 1:  # usable by the whole instance: its first room
                        store.set(f"{NS}/usable/{src}", repr(time.time()))
                q.add(room, src_rank=src)
                src_of[room], next_room = src, next_room + 1
            done, failed = q.step()
            out = [(r, "SUCCESS" if check(res, r) else "MISMATCH", "") for r, res in done]
            out += [(r, "FAILED", str(why)) for r, why in failed]
            for r, status, why in out:
                store.set(f"{NS}/result/{r}/{tp_rank}", json.dumps([src_of[r], status, why]))
            if tp_rank == 0 and out:
                store.add(f"{NS}/ended", len(out))
            if room < 0 and not out:
                time.sleep(0.002)
    finally:
        ctx.shutdown()
        dist.destroy_process_group()
    return rc


# ---------------------------------------------------------------- the driver


def summarize(args: argparse.Namespace, store: dist.Store, encoders: list[tuple[int, float]],
              killed_after: int | None) -> int:
    """Print what happened; 1 if anything but the killed encoder's rooms went wrong."""
    tp, killed = args.language_tp_size, encoders[0][0] if killed_after is not None else None
    counts = {"SUCCESS": 0, "FAILED": 0, "MISMATCH": 0}
    problems: list[str] = []
    lost: list[list[str]] = []  # the killed encoder's rooms: each TP rank's reason
    on: dict[int, int] = {}  # encoder id -> rooms SUCCESS from it
    for room in range(args.rooms):
        keys = [f"{NS}/result/{room}/{r}" for r in range(tp)]
        if not store.check(keys):
            problems.append(f"room {room}: no result on every TP rank")
            continue
        got = [json.loads(store.get(k)) for k in keys]  # [src, status, reason] per TP rank
        src, status, why = got[0]
        status = "MISMATCH" if any(g[1] == "MISMATCH" for g in got) else status
        counts[status] += 1
        on[src] = on.get(src, 0) + (status == "SUCCESS")
        if status == "FAILED" and src == killed:
            lost.append([g[2] for g in got])
        elif status != "SUCCESS":
            problems.append(f"room {room} from id {src}: {status} {why}")
    usable = [f"{float(store.get(k)) - t:.2f} s" if store.check([k]) else "never"
              for k, t in ((f"{NS}/usable/{i}", t) for i, t in encoders)]
    lines = [f"jobs demo: a Language job of TP {tp} (torchrun), encoder job {NAME!r}",
             f"  rooms      {args.rooms}: {counts['SUCCESS']} SUCCESS (every byte checked on "
             f"{tp} TP ranks), {counts['FAILED']} FAILED, {counts['MISMATCH']} mismatched",
             f"  encoder    id {encoders[0][0]}: usable {usable[0]} after its process started"]
    if killed_after is not None:
        new = encoders[1][0]
        lines += [f"  restart    id {killed} SIGKILLed after {killed_after} rooms ended: "
                  f"{len(lost)} rooms addressed to it FAILED; restarted as id {new}: usable "
                  f"{usable[1]} after its process started, {on.get(new, 0)} rooms SUCCESS on it"]
        lines += [f"  reason     {why}" for why in (lost[0] if lost else [])]
        if not on.get(new):
            problems.append("no room went to the restarted encoder")
    lines += [f"  PROBLEM    {p}" for p in problems]
    say("\n".join([*lines, f"  verdict    {'FAILED' if problems else 'OK'}"]))
    return 1 if problems else 0


def ranks_of(p: subprocess.Popen[bytes]) -> list[int]:
    """Pids of the processes `p` started (torchrun's ranks), from /proc."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError), open(stat) as f:
            if int(f.read().rsplit(")", 1)[1].split()[1]) == p.pid:
                out.append(int(stat.split("/")[2]))
    return out


def run_driver(args: argparse.Namespace) -> int:
    if args.port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the pairs' Gloo connections on loopback too
    child = ["-m", "launch.jobs_demo", *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (
        "port", "rooms", "language_tp_size", "timeout"))]
    children: list[subprocess.Popen[bytes]] = []

    def start(*cmd: str) -> subprocess.Popen[bytes]:  # own session: Ctrl-C reaches us alone
        children.append(subprocess.Popen([sys.executable, *cmd], env=env,
                                         start_new_session=True))
        return children[-1]

    def encoder() -> tuple[subprocess.Popen[bytes], tuple[int, float]]:
        """Start the encoder job; (process, (its id, when it started)) once it joined."""
        t0, p = time.time(), start(*child, "--as", "embedding")
        while not store.check([f"{NS}/id/{p.pid}"]):
            if p.poll() is not None or time.time() - t0 > args.timeout:
                raise RuntimeError(f"the encoder did not join (exit code {p.poll()})")
            time.sleep(0.005)
        return p, (int(store.get(f"{NS}/id/{p.pid}")), t0)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the cleanup below runs
    llm = None
    try:
        start("-m", "launch.rendezvous", "--host", "127.0.0.1", f"--port={args.port}")
        store = connect_store(f"tcp://127.0.0.1:{args.port}", 30.0)
        llm = start("-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(args.language_tp_size), *child, "--as", "language")
        enc, first = encoder()
        encoders, killed_after = [first], None
        if 0 < args.restart_after < args.rooms:
            deadline = time.monotonic() + args.timeout
            while (n := store.add(f"{NS}/ended", 0)) < args.restart_after:
                if llm.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the Language job ended or stalled before the restart")
                time.sleep(0.005)
            enc.kill()  # SIGKILL: no goodbye, rooms in flight
            enc.wait()
            say(f"jobs demo: SIGKILLed encoder id {first[0]} after {n} rooms ended; "
                f"restarting it under the same name")
            enc, again = encoder()
            encoders, killed_after = [first, again], n
        rc_llm = llm.wait(args.timeout + 30)
        store.set(f"{NS}/stop", "1")
        rc_enc = enc.wait(30)
        rc = summarize(args, store, encoders, killed_after)
        if rc_llm or rc_enc:
            say(f"jobs demo: exit codes: Language job {rc_llm}, encoder {rc_enc}")
        return rc or int(bool(rc_llm or rc_enc))
    except (RuntimeError, subprocess.TimeoutExpired, disagg.DisaggError) as e:
        say(f"jobs demo: FAILED: {type(e).__name__}: {e}")
        return 1
    except KeyboardInterrupt:
        say("jobs demo: interrupted")
        return 130
    finally:
        ranks = ranks_of(llm) if llm is not None and llm.poll() is None else []
        for p in reversed(children):  # by pid: SIGTERM, then SIGKILL
            p.terminate()
            try:
                p.wait(15.0 if p is llm else 5.0)  # torchrun ends its ranks on SIGTERM
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pid in ranks:  # a rank torchrun did not end, if that pid is still ours
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"launch.jobs_demo" in f.read():
                    os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side == "embedding":
        return run_embedding(args)
    if args.side == "language":
        return run_language(args)
    return run_driver(args)


if __name__ == "__main__":
    sys.exit(main())
