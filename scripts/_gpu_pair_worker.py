"""One rank of gpu_check.py's "pair" section: a real Embedding/Language pair of
two processes, each on a GPU of its own (NCCL), or both on the CPU (Gloo, the
dry-run). gpu_check starts both and reads what the Language rank writes.

    python scripts/_gpu_pair_worker.py --rank R --init tcp://127.0.0.1:P --store-port Q
        --device cuda|cpu --out DIR

Phases, in order, each one room or more (rank 0 is the Embedding rank):

  rooms    12 rooms of random length, half with seq_len given (pre-posted
           frames: one group launch for a frame's meta and payload), half not,
           some over several chunks: every byte compared.
  sync     a room whose sender waits DELAY_S after the ALLOC: while its meta
           recv stands, how long the caller's own stream's synchronize() and
           torch.cuda.synchronize() take (issue 29, finding 6).
  capture  two such rooms: a CUDA graph captured while the recv stands, with
           capture_error_mode "thread_local" (what docs/nccl.md asks), then
           "global" (torch's default): whether each capture and its room succeed;
           then a third: how long entering torch.cuda.graph() takes while a recv
           stands (it synchronises the device first).
  dead     the Embedding rank is SIGKILLed while a room waits for it: the room
           fails with the cause, the Language process outlives the pair group's
           timeout (the communicator was aborted, so torch's watchdog has nothing
           to kill it for; CUDA only), and shutdown() returns at once (finding 1, 4).

The two ranks keep in step through a TCPStore of their own (keys under "kit/").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import disagg  # noqa: E402
from disagg import TransferStatus  # noqa: E402
from launch.transfer import room_tensors  # noqa: E402

SEED, HIDDEN, BLOCK = 29, 1024, 16
DELAY_S = 2.0  # how long a sender waits after the ALLOC in the phases that need a standing recv
PEER_TIMEOUT_S, BOOTSTRAP_S = 2.0, 8.0
ROOMS = 12
ENDED = (TransferStatus.SUCCESS, TransferStatus.FAILED)


def config() -> disagg.DisaggConfig:
    return disagg.DisaggConfig(hidden_size=HIDDEN, block_size=BLOCK, num_blocks=256,
                               default_alloc_tokens=4 * BLOCK, host="127.0.0.1",
                               peer_timeout=PEER_TIMEOUT_S, bootstrap_timeout=BOOTSTRAP_S)


def tensors(room: int, device: torch.device) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    emb, ids, pos, aux = room_tensors(SEED, room, 1, 12 * BLOCK, HIDDEN)
    return [emb.to(device), ids.to(device), pos.to(device)], aux


def seq_len_of(room: int) -> int:
    return int(room_tensors(SEED, room, 1, 12 * BLOCK, HIDDEN)[0].shape[0])


def embedding(ctx: disagg.Context, store: dist.Store, device: torch.device) -> None:
    def send(room: int, after_go: bool) -> None:
        s = ctx.embedding.sender(room)
        if after_go:
            store.wait([f"kit/go/{room}"], datetime.timedelta(seconds=60))
            time.sleep(DELAY_S)
        (emb, ids, pos), aux = tensors(room, device)
        s.send(emb, ids, pos, aux=aux)
        if s.wait(60.0) is not TransferStatus.SUCCESS:
            raise AssertionError(f"room {room}: {s.failure}")

    for room in range(ROOMS):
        send(room, after_go=False)
    for room in (100, 200, 201, 202):  # sync, capture thread_local / global, graph()
        send(room, after_go=True)
    ctx.embedding.sender(300)  # dead: the ALLOC comes, the data never does
    store.wait(["kit/go/300"], datetime.timedelta(seconds=60))
    os.kill(os.getpid(), signal.SIGKILL)


def check(r: disagg.Receiver, room: int) -> None:
    res = r.result()
    (emb, ids, pos), aux = tensors(room, torch.device("cpu"))
    got = res.embeddings.cpu()
    if not torch.equal(got.view(torch.int16), emb.view(torch.int16)):
        raise AssertionError(f"room {room}: embeddings differ")
    if not torch.equal(res.fill_ids.cpu(), ids) or res.mrope_positions is None or \
            not torch.equal(res.mrope_positions.cpu(), pos):
        raise AssertionError(f"room {room}: ids or positions differ")
    if tuple(res.aux) != aux:
        raise AssertionError(f"room {room}: aux {tuple(res.aux)} != {aux}")


def language(ctx: disagg.Context, store: dist.Store, device: torch.device,
             out: dict[str, Any]) -> None:
    lang = ctx.language
    cuda = device.type == "cuda"

    # rooms: half pre-posted (seq_len known), half not
    t0 = time.perf_counter()
    chunks0 = ctx.stats()["chunks"]
    for room in range(ROOMS):
        r = lang.receiver(room, 0)
        inited = r.init(seq_len=seq_len_of(room)) if room % 2 == 0 else r.init()
        assert inited, f"room {room}: no blocks"
        if r.wait(60.0) is not TransferStatus.SUCCESS:
            raise AssertionError(f"room {room}: {r.failure}")
        check(r, room)
    out["rooms"] = {"rooms": ROOMS, "chunks": ctx.stats()["chunks"] - chunks0,
                    "seconds": time.perf_counter() - t0}

    def standing(room: int) -> disagg.Receiver:
        r = lang.receiver(room, 0)
        assert r.init(seq_len=seq_len_of(room))
        store.set(f"kit/go/{room}", "1")
        time.sleep(0.2)  # the recv is posted by now (its frame comes DELAY_S after "go")
        return r

    def finish(r: disagg.Receiver, room: int) -> str:
        status = r.wait(60.0)
        if status is TransferStatus.SUCCESS:
            check(r, room)
            return "SUCCESS"
        return f"{status.name}: {r.failure}"

    # sync: the caller's stream, then the device, while the meta recv stands
    r = standing(100)
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.current_stream().synchronize()
    stream_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
    device_s = time.perf_counter() - t0
    out["sync"] = {"stream_s": stream_s, "device_s": device_s, "delay_s": DELAY_S,
                   "room": finish(r, 100)}

    # capture: a graph captured while a recv stands, thread_local then global. The
    # capture is opened with capture_begin() (torch.cuda.graph() synchronises the
    # device on entry, which would wait for the frame first) and held 0.3 s, while
    # disagg's receive thread polls its recv's end event
    for room, mode in ((200, "thread_local"), (201, "global")):
        r = standing(room)
        outcome = "not run (no CUDA graphs on the CPU)"
        if cuda:
            x = torch.arange(1024, dtype=torch.float32, device=device)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream())
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.stream(side):
                    g.capture_begin(capture_error_mode=mode)
                    try:
                        y = x * 2 + 1
                        time.sleep(0.3)
                    finally:
                        g.capture_end()
                g.replay()
                torch.cuda.current_stream().wait_stream(side)
                ok = torch.equal(y.cpu(), torch.arange(1024, dtype=torch.float32) * 2 + 1)
                outcome = "captured, replay exact" if ok else "captured, replay WRONG"
            except Exception as e:
                outcome = f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
        out[f"capture_{mode}"] = {"capture": outcome, "room": finish(r, room)}

    # torch.cuda.graph()'s entry while a recv stands: it synchronises the device
    r = standing(202)
    enter_s = 0.0
    if cuda:
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device)
        x = torch.ones(8, device=device)
        side.wait_stream(torch.cuda.current_stream())
        t0 = time.perf_counter()
        with torch.cuda.graph(g, stream=side, capture_error_mode="thread_local"):
            enter_s = time.perf_counter() - t0
            y = x + 1
        g.replay()
        torch.cuda.current_stream().wait_stream(side)
        assert torch.equal(y.cpu(), torch.full((8,), 2.0)), "graph() replay: values differ"
    out["graph_entry"] = {"enter_s": enter_s, "delay_s": DELAY_S, "room": finish(r, 202)}

    # dead: the Embedding rank is killed while room 300 waits for its data
    r = lang.receiver(300, 0)
    assert r.init(seq_len=seq_len_of(300))
    store.set("kit/go/300", "1")
    t0 = time.perf_counter()
    status = r.wait(60.0)
    failed_s = time.perf_counter() - t0
    group_timeout = BOOTSTRAP_S + 2 * PEER_TIMEOUT_S
    if cuda:  # outlive the pair group's timeout: a watchdog that fired would end us here
        time.sleep(group_timeout + 3.0)
    alive = ctx.health().get(0, {}).get("alive")
    t0 = time.perf_counter()
    ctx.shutdown()
    out["dead"] = {"status": status.name, "failure": r.failure, "failed_s": failed_s,
                   "outlived_s": group_timeout + 3.0 if cuda else 0.0, "peer_alive": alive,
                   "shutdown_s": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--store-port", type=int, required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    out: dict[str, Any] = {"rank": a.rank}
    path = Path(a.out) / f"rank{a.rank}.json"
    store = dist.TCPStore("127.0.0.1", a.store_port, 2, a.rank == 0,
                          timeout=datetime.timedelta(seconds=60))
    try:
        ctx = disagg.init(config(), rank=a.rank, world_size=2, init_method=a.init)
        device = torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" \
            else torch.device("cpu")
        out["backend"] = dist.get_backend()
        if ctx.role == "embedding":
            path.write_text(json.dumps(out))
            embedding(ctx, store, device)
        else:
            language(ctx, store, device, out)
    except BaseException:
        out["error"] = traceback.format_exc()[-2000:]
        path.write_text(json.dumps(out))
        return 1
    path.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
