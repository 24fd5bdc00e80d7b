"""Items: what reuse and fan-in save, against rooms without items, in one run.

    python scripts/bench_items.py [--requests 12] [--images 4] [--encode-ms 20]

Three ranks on this machine (Gloo over 127.0.0.1): Embedding ranks 0 and 1,
Language rank 2. For each reuse rate (default 0 %, 50 %, 90 %) a stream of
requests of --images images each is generated: each image repeats an image
the stream showed before with that probability, else it is new. Every request
is run in three modes, interleaved request by request so all see the same
machine:

- "plain": a room without items from Embedding rank 0, which encodes every
  image (a sleep of --encode-ms each stands in for the vision tower) and sends
  every row;
- "items-1": the same request declared as items, all from rank 0, which asks
  `needed()` first and encodes and sends only the misses;
- "items-2": as items-1, with image i encoded by rank i % 2 (fan-in): the two
  encoders work at the same time.

Each mode has its own keys, so its cache holds only its own history. The
Language side runs each request with each caller style in turn (--callers):
"serving", a `queue()` loop that does 2 ms of GIL-holding Python between
steps; "spin", a `queue()` loop that steps without pause; "wait", a bare
receiver blocked in `wait()`. Reported per caller, rate and mode: bytes sent,
images encoded, and the time from the request's arrival on the Language rank
(`q.add` / `init`) to the room done there, median (min-max), with the ratio to
"plain" of the same caller in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("plain", "items-1", "items-2")
CALLERS = ("serving", "spin", "wait")
SERVING_WORK_S = 0.002  # Python a serving loop runs between steps (scripts/_bench_scenarios.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def schedule(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every request, in run order: its room, rate, mode and images (ids)."""
    out = []
    room = 0
    for rate in args.rates:
        rng = random.Random(f"{args.seed}/{rate}")
        seen: list[int] = []
        for k in range(args.requests):
            images = []
            for _ in range(args.images):
                if seen and rng.random() < rate:
                    images.append(rng.choice(seen))
                else:
                    images.append(len(seen))
                    seen.append(len(seen))
            for caller in args.callers:
                for mode in MODES:
                    out.append({"room": room, "rate": rate, "mode": mode, "images": images,
                                "request": k, "caller": caller})
                    room += 1
    return out


def tag_of(req: dict[str, Any]) -> str:
    return f"{req['caller']}/{req['mode']}/{req['rate']}"


def key(req: dict[str, Any], image: int) -> bytes:
    return f"{req['caller']}/{req['mode']}/{req['rate']}/{image}".encode()


def source(req: dict[str, Any], i: int) -> int:
    return i % 2 if req["mode"] == "items-2" else 0


def _embedding(ctx: Any, store: Any, args: argparse.Namespace, rows: Any) -> dict[str, Any]:
    import torch
    ids = torch.zeros(args.tokens_per_image, dtype=torch.int32)
    encoded: dict[str, int] = {}
    for req in schedule(args):
        mine = [i for i in range(len(req["images"])) if source(req, i) == ctx.rank]
        if not mine or (req["mode"] == "plain" and ctx.rank != 0):
            continue
        store.wait([f"bench/req/{req['room']}"])
        s = ctx.embedding.sender(req["room"])
        if req["mode"] == "plain":
            needed = list(range(len(req["images"])))
        else:
            needed = s.needed(timeout_s=60.0)
            assert needed is not None, s.failure
        for _ in needed:
            time.sleep(args.encode_ms / 1000)  # the vision tower, one image at a time
        tag = tag_of(req)
        encoded[tag] = encoded.get(tag, 0) + len(needed)
        if needed:
            n = len(needed) * args.tokens_per_image
            s.send(rows[:n], ids.repeat(len(needed)))
        assert s.wait(60.0).name == "SUCCESS", s.failure
    return {"encoded": encoded}


def _busy(seconds: float) -> None:
    """Pure-Python work that holds the GIL, as a serving loop's scheduler does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _language(ctx: Any, store: Any, args: argparse.Namespace) -> dict[str, Any]:
    import disagg
    q = ctx.language.queue()
    lat: dict[str, list[float]] = {}
    sent: dict[str, int] = {}
    per_token = args.hidden_size * 2 + 4
    for req in schedule(args):
        room, tag = req["room"], tag_of(req)
        items = None if req["mode"] == "plain" else [
            disagg.Item(key(req, im), args.tokens_per_image, src_rank=source(req, i))
            for i, im in enumerate(req["images"])]
        seq_len = args.images * args.tokens_per_image
        t0 = time.monotonic()
        if req["caller"] == "wait":  # a bare receiver, blocked in wait()
            r = ctx.language.receiver(room, src_rank=0)
            assert r.init(seq_len=seq_len) if items is None else r.init(items=items)
            hits = len(r.hits)
            store.set(f"bench/req/{room}", "1")
            while r.wait(60.0).name not in ("SUCCESS", "FAILED"):
                r.resume()
            assert r.poll().name == "SUCCESS", r.failure
            res = r.result()
        else:
            if items is None:
                q.add(room, src_rank=0, seq_len=seq_len)
            else:
                q.add(room, items=items)
            hits = len(q.hits(room))
            store.set(f"bench/req/{room}", "1")
            while True:
                done, failed = q.step()
                assert not failed, failed
                if done:
                    break
                if req["caller"] == "serving":
                    _busy(SERVING_WORK_S)
            res = done[0][1]
        lat.setdefault(tag, []).append(time.monotonic() - t0)
        misses = len(req["images"]) - hits
        sent[tag] = sent.get(tag, 0) + misses * args.tokens_per_image * per_token
        ctx.language.recycle(res)
    return {"latency_s": lat, "bytes_sent": sent}


def _rank(rank: int, port: int, args: argparse.Namespace, out: Any) -> None:
    import torch

    import disagg
    torch.set_num_threads(1)
    image_bytes = args.tokens_per_image * (args.hidden_size * 2 + 4)
    cfg = disagg.DisaggConfig(num_embedding_ranks=2, hidden_size=args.hidden_size,
                              block_size=64, num_blocks=1024, mrope=False,
                              item_cache_bytes=4 * len(args.rates) * len(args.callers)
                              * args.requests * args.images * image_bytes,
                              peer_timeout=30.0, slow_room_s=None)
    ctx = disagg.init(cfg, rank=rank, world_size=3, init_method=f"tcp://127.0.0.1:{port}")
    store = disagg.context.dist.distributed_c10d._get_default_store()
    try:
        if ctx.role == "embedding":
            rows = torch.randn(args.images * args.tokens_per_image,
                               args.hidden_size).to(torch.bfloat16)
            res = _embedding(ctx, store, args, rows)
            res["bytes_sent_total"] = ctx.stats()["bytes_sent"]
        else:
            res = _language(ctx, store, args)
        out.put((rank, res))
    finally:
        ctx.shutdown()


def report(args: argparse.Namespace, results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    lang = results[2]
    encoded: dict[str, int] = {}
    for r in (0, 1):
        for tag, n in results[r]["encoded"].items():
            encoded[tag] = encoded.get(tag, 0) + n
    print(f"{args.requests} requests x {args.images} images of {args.tokens_per_image} tokens "
          f"(hidden {args.hidden_size}, {args.encode_ms:g} ms encode each); modes and callers "
          f"interleaved")
    print("request -> room held by the LLM, ms: median (min-max); ratio of medians to plain")
    table: dict[str, Any] = {}
    for caller in args.callers:
        for rate in args.rates:
            base = statistics.median(lang["latency_s"][f"{caller}/plain/{rate}"])
            print(f"{caller} caller, reuse {rate:.0%}:")
            for mode in MODES:
                tag = f"{caller}/{mode}/{rate}"
                ms = [1000 * x for x in lang["latency_s"][tag]]
                med = statistics.median(ms)
                mib = lang["bytes_sent"][tag] / (1 << 20)
                print(f"  {mode:8s} {med:7.1f} ({min(ms):.1f}-{max(ms):.1f}) "
                      f"x{med / 1000 / base:4.2f}   sent {mib:7.2f} MiB   "
                      f"encoded {encoded.get(tag, 0):3d} images")
                table[tag] = {"ms": ms, "bytes_sent": lang["bytes_sent"][tag],
                              "encoded": encoded.get(tag, 0)}
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=12, help="requests per reuse rate")
    p.add_argument("--images", type=int, default=4, help="images per request")
    p.add_argument("--tokens-per-image", type=int, default=256, help="rows per image")
    p.add_argument("--hidden-size", type=int, default=1024, help="embedding width")
    p.add_argument("--encode-ms", type=float, default=20.0, help="simulated encode per image")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5, 0.9],
                   help="reuse rates: the chance that an image repeats an earlier one")
    p.add_argument("--callers", nargs="+", choices=CALLERS, default=list(CALLERS),
                   help="Language caller styles, each run on every request")
    p.add_argument("--seed", type=int, default=0, help="seed of the request streams")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, args, out)) for r in range(3)]
    for pr in procs:
        pr.start()
    try:
        results = dict(out.get(timeout=900) for _ in procs)
    finally:
        for pr in procs:
            pr.join(30)
            if pr.is_alive():
                pr.kill()
    table = report(args, results)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
                                         "figures": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
