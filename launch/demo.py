"""Demo pipeline: a vision encoder on Embedding ranks, embeddings moved with
disagg to tensor-parallel Language ranks, checked bit for bit, then a prefill
stand-in.

    torchrun --standalone --nproc-per-node 3 -m launch.demo
    torchrun --standalone --nproc-per-node 2 -m launch.demo --language-tp-size 1
    torchrun --standalone --nproc-per-node 4 -m launch.demo --num-embedding-ranks 2 --language-tp-size 1

Room r is a request of 1..N seeded images (`launch.vision.synthetic_request`);
Embedding rank r % E encodes it and sends embeddings [seq, hidden] bf16, the
image-pad fill_ids and M-RoPE positions [3, seq], with aux = (mrope_position_delta,
checksum_lo, checksum_hi, num_images, prompt_len). Language instance
r % num_instances receives it on every TP rank, recomputes the 64-bit checksum
(blake2b over the bytes of the three tensors) and compares it with aux. Exit
code 1 on any mismatch, failed room or timeout; `--corrupt-room N` flips one
byte of room N after its checksum was taken, to show that this is caught.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import logging
import math
import struct
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import disagg
from disagg import DisaggConfig, EmbeddingResult, PoolFull, TransferStatus
from launch._start import init_or_explain
from launch.vision import (
    IMAGE_PAD_ID,
    TOKEN_PX,
    Request,
    VisionEncoder,
    fill_ids,
    mrope_positions,
    synthetic_request,
)

ENDED = (TransferStatus.SUCCESS, TransferStatus.FAILED)
AUX_FIELDS = ("mrope_position_delta", "checksum_lo", "checksum_hi", "num_images", "prompt_len")


def say(text: str, *, err: bool = False) -> None:
    """One write per message: ranks share the terminal, and print() writes the
    text and the newline separately (interleaved lines when unbuffered)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=32, help="requests (rooms) to run")
    p.add_argument("--min-images", type=int, default=1, help="fewest images per request")
    p.add_argument("--max-images", type=int, default=3, help="most images per request")
    p.add_argument("--min-size", type=int, default=112,
                   help=f"smallest image side in pixels (sides are multiples of {TOKEN_PX})")
    p.add_argument("--max-size", type=int, default=896, help="largest image side in pixels")
    p.add_argument("--hidden-size", type=int, default=1024, help="embedding width (LLM hidden)")
    p.add_argument("--depth", type=int, default=2, help="vision transformer blocks")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block")
    p.add_argument("--num-blocks", type=int, default=64, help="blocks per rank's pool")
    p.add_argument("--default-alloc-tokens", type=int, default=1024,
                   help="first allocation per room (longer rooms resume)")
    p.add_argument("--max-in-flight", type=int, default=8,
                   help="rooms a rank holds at once (encoded and unsent, or queued)")
    p.add_argument("--num-embedding-ranks", type=int, default=1,
                   help="ranks [0, E) run the encoder")
    p.add_argument("--language-tp-size", type=int, default=2,
                   help="ranks per Language instance, after the Embedding ranks")
    p.add_argument("--seed", type=int, default=0, help="seeds requests and weights")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole run")
    p.add_argument("--corrupt-room", type=int, default=None,
                   help="flip one byte of this room's embeddings after its checksum")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if min(args.requests, args.num_embedding_ranks, args.language_tp_size, args.depth,
           args.max_in_flight, args.hidden_size) < 1:
        p.error("--requests, --num-embedding-ranks, --language-tp-size, --depth, "
                "--max-in-flight and --hidden-size must be >= 1")
    if not 1 <= -(-args.min_size // TOKEN_PX) <= args.max_size // TOKEN_PX:
        p.error(f"need a multiple of {TOKEN_PX} in [--min-size, --max-size], got "
                f"[{args.min_size}, {args.max_size}]")
    if not 1 <= args.min_images <= args.max_images:
        p.error("need 1 <= --min-images <= --max-images")
    longest = args.max_images * (args.max_size // TOKEN_PX) ** 2
    if longest > args.num_blocks * args.block_size:
        p.error(f"the longest request ({args.max_images} images of {args.max_size}px: "
                f"{longest} tokens) exceeds the Embedding budget of --num-blocks x "
                f"--block-size = {args.num_blocks * args.block_size} tokens")
    if args.corrupt_room is not None and not 0 <= args.corrupt_room < args.requests:
        p.error(f"--corrupt-room must name a room in [0, {args.requests})")
    return args


def request_of(args: argparse.Namespace, room: int) -> Request:
    return synthetic_request(args.seed, room, min_images=args.min_images,
                             max_images=args.max_images, min_size=args.min_size,
                             max_size=args.max_size)


def checksum(emb_TH: torch.Tensor, ids_T: torch.Tensor, pos_3T: torch.Tensor) -> tuple[int, int]:
    """64-bit blake2b over the tensors' bytes, as two int32-range ints for aux."""
    h = hashlib.blake2b(digest_size=8)
    for t in (emb_TH.view(torch.int16), ids_T, pos_3T):
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).data)
    lo, hi = struct.unpack("<ii", h.digest())
    return lo, hi


@dataclass
class Outgoing:
    """A room handed to (or waiting for) its sender; the tensors stay alive and
    untouched until the sender is SUCCESS or FAILED."""

    room: int
    sender: disagg.Sender
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    aux: tuple[int, ...]


def encode(ctx: disagg.Context, args: argparse.Namespace, encoder: VisionEncoder,
           room: int) -> Outgoing:
    req = request_of(args, room)
    emb_TH = encoder(req.images)
    ids_T = fill_ids(emb_TH.shape[0])
    text_before, text_after = req.text_lens()
    pos_3T, delta = mrope_positions(req.grids_thw, text_before, text_after)
    lo, hi = checksum(emb_TH, ids_T, pos_3T)
    if room == args.corrupt_room:
        with torch.inference_mode():
            flat = emb_TH.view(torch.uint8).view(-1)
            flat[flat.numel() // 2] ^= 0xFF
        say(f"[embedding rank {ctx.rank}] room {room}: flipped one byte after the "
            f"checksum (--corrupt-room)", err=True)
    prompt_len = sum(text_before) + text_after + emb_TH.shape[0]
    tensors = (emb_TH.to(ctx.device), ids_T.to(ctx.device), pos_3T.to(ctx.device))
    return Outgoing(room, ctx.embedding.sender(room), tensors,
                    (delta, lo, hi, len(req.images), prompt_len))


def run_embedding(ctx: disagg.Context, args: argparse.Namespace, deadline: float) -> int:
    e = ctx.rank
    encoder = VisionEncoder(args.hidden_size, depth=args.depth, seed=args.seed)
    todo = collections.deque(r for r in range(args.requests) if r % args.num_embedding_ranks == e)
    in_flight: list[Outgoing] = []
    blocked: Outgoing | None = None  # PoolFull: the same sender sends again later
    ok = failed = tokens = 0
    encode_s = 0.0
    t0 = time.monotonic()
    while todo or blocked or in_flight:
        if time.monotonic() > deadline:
            say(f"[embedding rank {e}] timed out: {len(todo)} rooms not encoded, "
                f"{len(in_flight) + (blocked is not None)} not finished", err=True)
            return 1
        for o in [o for o in in_flight if o.sender.poll() in ENDED]:
            in_flight.remove(o)
            if o.sender.poll() == TransferStatus.SUCCESS:
                ok += 1
                tokens += o.tensors[0].shape[0]
            else:
                failed += 1
                say(f"[embedding rank {e}] room {o.room} FAILED: {o.sender.failure}",
                    err=True)
        if blocked is None and todo and len(in_flight) < args.max_in_flight:
            t = time.monotonic()
            blocked = encode(ctx, args, encoder, todo.popleft())
            encode_s += time.monotonic() - t
        if blocked is not None:
            try:
                blocked.sender.send(*blocked.tensors, aux=blocked.aux)
                in_flight.append(blocked)
                blocked = None
                continue
            except PoolFull:  # the room is untouched: keep it and retry once budget frees up
                pass
        if in_flight:
            in_flight[0].sender.wait(0.05)
        elif blocked is not None:
            time.sleep(0.001)  # budget still draining from an ended room
    elapsed = time.monotonic() - t0
    st = ctx.stats()
    sent = st["bytes_sent"]
    assert isinstance(sent, int)
    # a terminal may hold the Language rank's progress bar mid-line: start a fresh one
    lead = "\n" if sys.stdout.isatty() else ""
    say(f"{lead}[embedding rank {e}] {'OK' if not failed else 'FAILED'}: {ok} requests, "
        f"{tokens} tokens, {sent / 1e6:.1f} MB sent in {elapsed:.1f}s "
        f"({sent / elapsed / 1e9:.3f} GB/s), encoder {encode_s:.1f}s, "
        f"resumes={st['resumes']} failures={st['failures']}")
    return 1 if failed else 0


class PrefillStandIn:
    """RMSNorm, then this TP rank's shard of one seeded Linear (column parallel:
    rank k computes output features [k*H/T, (k+1)*H/T)), as the first thing a
    tensor-parallel prefill does with the embeddings; no communication needed."""

    def __init__(self, hidden: int, tp_rank: int, tp_size: int, seed: int,
                 device: torch.device) -> None:
        g = torch.Generator().manual_seed(seed + 1)
        w_HH = torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden)
        self.w_shard = w_HH.chunk(tp_size)[tp_rank].contiguous().to(device)

    @torch.inference_mode()
    def __call__(self, emb_TH: torch.Tensor) -> torch.Tensor:
        x = emb_TH.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return F.linear(x, self.w_shard).to(torch.bfloat16)


def verify(res: EmbeddingResult, hidden: int) -> str | None:
    """None if the room arrived intact, else what is wrong."""
    emb_TH, ids_T, pos_3T = res.embeddings, res.fill_ids, res.mrope_positions
    seq = emb_TH.shape[0]
    if emb_TH.dtype != torch.bfloat16 or tuple(emb_TH.shape) != (seq, hidden):
        return f"embeddings {emb_TH.dtype} {list(emb_TH.shape)}, expected bf16 [seq, {hidden}]"
    if pos_3T is None or tuple(pos_3T.shape) != (3, seq):
        return f"mrope_positions {None if pos_3T is None else list(pos_3T.shape)}, expected [3, {seq}]"
    if tuple(ids_T.shape) != (seq,) or not bool((ids_T == IMAGE_PAD_ID).all()):
        return f"fill_ids are not {seq} x the image-pad id {IMAGE_PAD_ID}"
    if len(res.aux) != len(AUX_FIELDS):
        return f"aux {res.aux}, expected {len(AUX_FIELDS)} values {AUX_FIELDS}"
    got = checksum(emb_TH, ids_T, pos_3T)
    if got != tuple(res.aux[1:3]):
        return f"checksum {got} of the received bytes != {tuple(res.aux[1:3])} sent"
    return None


def run_language(ctx: disagg.Context, args: argparse.Namespace, deadline: float) -> int:
    num_e, tp = args.num_embedding_ranks, args.language_tp_size
    num_instances = (ctx.world_size - num_e) // tp
    assert ctx.instance is not None
    tp_rank = (ctx.rank - num_e) % tp
    first = num_e + ctx.instance * tp
    tag = f"[language rank {ctx.rank}, instance {ctx.instance}]"
    todo = collections.deque(range(ctx.instance, args.requests, num_instances))
    total = len(todo)
    prefill = PrefillStandIn(args.hidden_size, tp_rank, tp, args.seed, ctx.device)
    q = ctx.language.queue()
    added_at: dict[int, float] = {}
    latencies: list[float] = []
    done_n = bad = failed_n = tokens = 0
    prefill_s = 0.0
    show = ctx.instance == 0 and tp_rank == 0 and not args.no_progress and sys.stderr.isatty()
    bar = tqdm(total=total, unit="req", desc=f"instance {ctx.instance}", disable=not show)
    t0 = time.monotonic()
    try:
        while todo or len(q):
            # Same adds in the same order on every TP rank: len(q) is the same on all of them.
            while todo and len(q) < args.max_in_flight:
                room = todo.popleft()
                q.add(room, src_rank=room % num_e)
                added_at[room] = time.monotonic()
            if time.monotonic() > deadline:
                say(f"{tag} timed out with {len(q) + len(todo)} rooms left", err=True)
                return 1
            done, failed = q.step()
            now = time.monotonic()
            for room, res in done:
                latencies.append(now - added_at.pop(room))
                problem = verify(res, args.hidden_size)
                if problem is not None:
                    bad += 1
                    say(f"{tag} room {room}: MISMATCH: {problem}", err=True)
                    continue
                t = time.monotonic()
                prefill(res.embeddings)
                prefill_s += time.monotonic() - t
                done_n += 1
                tokens += res.embeddings.shape[0]
            for room, reason in failed:
                added_at.pop(room, None)
                failed_n += 1
                say(f"{tag} room {room} FAILED: {reason}", err=True)
            bar.update(len(done) + len(failed))
            if not done and not failed:
                time.sleep(0.01)
    finally:
        bar.close()
    elapsed = time.monotonic() - t0
    if tp_rank == 0:
        print_summary(ctx, args, first, total, done_n, bad, failed_n, tokens, latencies,
                      elapsed, prefill_s)
    return 1 if bad or failed_n else 0


def _transfer_line(st: dict[str, object]) -> str:
    """The transfer alone, from the library's own stage latencies: a chunk's
    payload landing and a room's ALLOC -> first byte (no encoder time)."""
    lat = st.get("latency_s")
    if not isinstance(lat, dict) or "chunk_transfer_s" not in lat:
        return "no chunk landed"
    chunk, first = lat["chunk_transfer_s"], lat.get("alloc_to_first_byte_s", {})
    return (f"chunk lands in p50 {chunk['p50'] * 1e3:.1f} ms / p99 {chunk['p99'] * 1e3:.1f} ms; "
            f"ALLOC -> first byte p50 {first.get('p50', 0.0) * 1e3:.1f} ms (data ready or not)")


def print_summary(ctx: disagg.Context, args: argparse.Namespace, first: int, total: int,
                  done_n: int, bad: int, failed_n: int, tokens: int, latencies: list[float],
                  elapsed: float, prefill_s: float) -> None:
    st = ctx.stats()
    recv = st["bytes_received"]
    assert isinstance(recv, int)
    tp = args.language_tp_size
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    verdict = "OK" if done_n == total else "FAILED"
    rows = [
        ("requests", f"{done_n}/{total} verified, {bad} mismatched, {failed_n} failed"),
        ("tokens", f"{tokens}"),
        ("bytes moved", f"{recv / 1e6:.1f} MB to this rank, {tp * recv / 1e6:.1f} MB "
                        f"to the instance"),
        ("throughput", f"{recv / elapsed / 1e9:.3f} GB/s per rank over the {elapsed:.1f}s "
                       f"run, encoding included"),
        ("latency p50", f"{np.percentile(lat, 50) * 1e3:.0f} ms (q.add -> done, waiting for "
                        f"the encoder included)"),
        ("latency p99", f"{np.percentile(lat, 99) * 1e3:.0f} ms"),
        ("transfer", _transfer_line(st)),
        ("chunks", f"{st['chunks']}"),
        ("resumes", f"{st['resumes']}"),
        ("failures", f"{st['failures']}"),
        ("prefill", f"{prefill_s:.2f}s (stand-in, this rank's shard)"),
    ]
    lines = [f"language instance {ctx.instance} (ranks {first}..{first + tp - 1}, TP {tp}): "
             f"{verdict}"]
    lines += [f"  {name:<12} {value}" for name, value in rows]
    say("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)  # deterministic encoder output, and 2 cores shared by all ranks
    cfg = DisaggConfig(num_embedding_ranks=args.num_embedding_ranks,
                       language_tp_size=args.language_tp_size, hidden_size=args.hidden_size,
                       block_size=args.block_size, num_blocks=args.num_blocks,
                       default_alloc_tokens=args.default_alloc_tokens,
                       bootstrap_timeout=args.timeout, peer_timeout=30.0)
    ctx = init_or_explain(cfg, "launch.demo")
    if ctx is None:
        return 2
    rc = 1
    try:
        deadline = time.monotonic() + args.timeout
        if ctx.role == "embedding":
            rc = run_embedding(ctx, args, deadline)
        else:
            rc = run_language(ctx, args, deadline)
    except disagg.DisaggError as e:
        say(f"[{ctx.role} rank {ctx.rank}] {type(e).__name__}: {e}", err=True)
        rc = 1
    finally:
        ctx.shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
