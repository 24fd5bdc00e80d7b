"""Progressive delivery: send each image as it is encoded, prefill on the prefix.

    torchrun --standalone --nproc-per-node 2 examples/progressive.py

Rank 0 encodes a request's images one after another (a stand-in encoder that
takes --encode-ms per image) and sends each image's embeddings the moment they
exist: the first `send()` declares the request's length, later ones add the
next image. Rank 1 runs a chunked-prefill stand-in on `queue().prefix(room)`
as it grows, so prefill starts on the first image while the others are still
being encoded. Every byte is checked against what was sent.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import disagg
from disagg import TransferStatus


def encode_image(request: int, image: int, tokens: int, hidden: int) -> tuple[torch.Tensor, ...]:
    """A stand-in vision encoder: seeded embeddings, image-pad ids, M-RoPE positions."""
    g = torch.Generator().manual_seed(request * 1000 + image)
    emb = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    ids = torch.full((tokens,), 151655, dtype=torch.int32)
    pos = torch.arange(image * tokens, (image + 1) * tokens, dtype=torch.int32).expand(3, -1)
    return emb, ids, pos.contiguous()


def embedding_side(ctx: disagg.Context, args: argparse.Namespace) -> int:
    total = args.images * args.tokens_per_image
    for request in range(args.requests):
        s = ctx.embedding.sender(request)
        parts = []  # keep every part alive until the room ends
        for image in range(args.images):
            time.sleep(args.encode_ms / 1000)  # the encoder at work
            parts.append(encode_image(request, image, args.tokens_per_image, args.hidden_size))
            first = {"seq_len": total, "aux": (request, args.images)} if image == 0 else {}
            s.send(*parts[-1], **first)  # leaves now: the Language side may start on it
        if s.wait(args.timeout) != TransferStatus.SUCCESS:
            print(f"[embedding] request {request} failed: {s.failure}")
            return 1
    print(f"[embedding] sent {args.requests} requests of {args.images} images, one at a time")
    return 0


def language_side(ctx: disagg.Context, args: argparse.Namespace) -> int:
    total = args.images * args.tokens_per_image
    q = ctx.language.queue()
    for request in range(args.requests):
        q.add(request, src_rank=0, seq_len=total)
    prefilled = {request: 0 for request in range(args.requests)}
    chunks_before_last_image = 0
    deadline = time.monotonic() + args.timeout
    while len(q):
        done, failed = q.step()
        if failed:
            print(f"[language] failed: {failed}")
            return 1
        for request in [r for r in prefilled if r not in dict(done)]:
            ready = q.ready_tokens(request)
            if ready > prefilled[request]:  # chunked prefill on what every TP rank holds
                chunk = q.prefix(request).embeddings[prefilled[request]:ready]
                chunk.float().sum()  # stand-in for the model's prefill of these tokens
                chunks_before_last_image += ready < total
                prefilled[request] = ready
        for request, res in done:
            want = torch.cat([encode_image(request, i, args.tokens_per_image,
                                           args.hidden_size)[0] for i in range(args.images)])
            if not torch.equal(res.embeddings.view(torch.int16), want.view(torch.int16)):
                print(f"[language] request {request}: embeddings differ")
                return 1
            del prefilled[request]
        if time.monotonic() > deadline:
            print("[language] timed out")
            return 1
        time.sleep(0.001)
    print(f"[language] {args.requests} requests bit-exact; {chunks_before_last_image} prefill "
          f"chunks ran before the request's last image arrived")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=4, help="requests to move")
    p.add_argument("--images", type=int, default=4, help="images per request")
    p.add_argument("--tokens-per-image", type=int, default=256, help="tokens per image")
    p.add_argument("--encode-ms", type=float, default=50.0, help="encoder time per image")
    p.add_argument("--hidden-size", type=int, default=1024, help="embedding width")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole run")
    args = p.parse_args(argv)
    cfg = disagg.DisaggConfig(hidden_size=args.hidden_size, block_size=64, num_blocks=256,
                              default_alloc_tokens=args.images * args.tokens_per_image)
    ctx = disagg.init(cfg)
    try:
        return (embedding_side if ctx.role == "embedding" else language_side)(ctx, args)
    finally:
        ctx.shutdown()


if __name__ == "__main__":
    sys.exit(main())
