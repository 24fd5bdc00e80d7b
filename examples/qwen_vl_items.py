"""Items with a real model: a multi-turn chat that resends every earlier image,
on Hugging Face Qwen2-VL, Qwen2.5-VL and Qwen3-VL, from one or several encoders.

    pip install -e ".[hf]"
    torchrun --standalone --nproc-per-node 2 examples/qwen_vl_items.py
    torchrun --standalone --nproc-per-node 3 examples/qwen_vl_items.py --encoders 2

Turn t of the conversation shows images 0..t: each turn adds one image and
resends the others, as chat frontends do. Each image is one `disagg.Item`
keyed by sha256(model id, processor config, image bytes), with its row count
from the image processor's grid (the frontend knows it before any encoding).
With `--encoders 2` image i is encoded by Embedding rank i % 2: one room, two
sources (fan-in).

Embedding ranks ask `needed()` before they encode and run the vision tower
only on those images: images the Language instance holds already are never
encoded again and move 0 bytes. Language ranks (`queue()`, any TP size)
rebuild the prompt's ids and M-RoPE positions themselves (an item's rows are
position-free: embeddings, fill ids, and Qwen3-VL's deepstack features), run
the LLM, and compare the logits with the monolithic model's bit for bit.
Each Language rank prints `OK <model>` with the hits, the encodes skipped and
the bytes not sent; each Embedding rank prints what it encoded.
docs/items.md explains keys, cache sizing and fan-in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from qwen_vl import (
    MODELS,
    TEXT_IDS,
    deepstack_layers,
    expand,
    image_processor,
    llm_logits,
    reference_logits,
    rope_index,
    tiny_model,
)

import disagg
from disagg import TransferStatus

try:
    import transformers
    from PIL import Image
except ImportError as e:  # the optional extra: pip install -e ".[hf]"
    raise SystemExit(f"qwen_vl_items.py needs transformers and Pillow (pip install -e "
                     f"\".[hf]\"): {e}") from e


def disagg_config(model: Any, args: argparse.Namespace) -> disagg.DisaggConfig:
    text = model.config.text_config
    extra = {f"deepstack_{i}": ((text.hidden_size,), "bfloat16")
             for i in range(deepstack_layers(model))}
    return disagg.DisaggConfig(
        num_embedding_ranks=args.encoders, language_tp_size=args.language_tp_size,
        hidden_size=text.hidden_size, dtype="bfloat16",
        # Items are reused at other places in later prompts: their rows must not
        # depend on the place. M-RoPE positions do, so the Language side makes
        # them from the grids it knows (it declared the items).
        mrope=False, extra_buffers=extra, backend="gloo",
        block_size=16, num_blocks=256, item_cache_bytes=64 << 20,
        bootstrap_timeout=args.timeout, peer_timeout=10.0)


def image(seed: int, i: int, factor: int) -> Image.Image:
    rng = np.random.default_rng([seed, 1000 + i])
    h, w = (int(rng.integers(2, 6)) * factor + int(rng.integers(0, factor // 2))
            for _ in range(2))
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def conversation(model: Any, seed: int, turns: int) -> list[tuple[list[int], list[int]]]:
    """Per turn: the text prompt (one image-pad token per image) and its images'
    indices, 0..t: every turn resends the earlier images."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    out, prompt = [], rng.integers(0, TEXT_IDS, 3).tolist()
    for t in range(turns):
        prompt = [*prompt, cfg.vision_start_token_id, cfg.image_token_id,
                  cfg.vision_end_token_id, *rng.integers(0, TEXT_IDS, 2).tolist()]
        out.append((list(prompt), list(range(t + 1))))
    return out


def item_key(name: str, proc: Any, img: Image.Image) -> bytes:
    """What names an image's rows: the model, the processor's settings, the pixels."""
    h = hashlib.sha256(name.encode())
    h.update(json.dumps(proc.to_dict(), sort_keys=True, default=str).encode())
    h.update(img.tobytes())
    return h.digest()


class Images:
    """The conversation's images, their keys and row counts, as both sides make them."""

    def __init__(self, name: str, model: Any, seed: int, count: int) -> None:
        vc = model.config.vision_config
        self.proc = image_processor(model)
        self.images = [image(seed, i, vc.patch_size * vc.spatial_merge_size)
                       for i in range(count)]
        self.keys = [item_key(name, self.proc, im) for im in self.images]
        self.grids = [self.proc(images=[im], return_tensors="pt")["image_grid_thw"]
                      for im in self.images]
        merge = vc.spatial_merge_size
        self.rows = [int(g.prod()) // merge**2 for g in self.grids]

    def items(self, indices: list[int], encoders: int) -> list[disagg.Item]:
        return [disagg.Item(self.keys[i], self.rows[i], src_rank=i % encoders)
                for i in indices]


def embedding_side(ctx: disagg.Context, name: str, model: Any, args: argparse.Namespace,
                   turns: list[tuple[list[int], list[int]]], imgs: Images) -> int:
    encoded = skipped = 0
    keep = []
    for room, (_, indices) in enumerate(turns):
        mine = [k for k, i in enumerate(indices) if i % args.encoders == ctx.rank]
        if not mine:
            continue  # no item of this room is ours: nobody asks us
        s = ctx.embedding.sender(room)
        needed = s.needed(timeout_s=args.timeout)  # before encoding: skip the hits
        if needed is None:
            print(f"[embedding {ctx.rank}] {name} room {room}: no answer ({s.failure})",
                  flush=True)
            return 1
        skipped += len(mine) - len(needed)
        if needed:
            batch = [imgs.images[indices[k]] for k in needed]
            px = imgs.proc(images=batch, return_tensors="pt")
            with torch.no_grad():  # the vision tower only, on the needed images only
                out = model.model.visual(px["pixel_values"].to(model.dtype),
                                         grid_thw=px["image_grid_thw"])
            emb = out.pooler_output
            ids = torch.full((emb.shape[0],), model.config.image_token_id, dtype=torch.int32)
            extra = {f"deepstack_{i}": d for i, d in enumerate(
                getattr(out, "deepstack_features", None) or ())}
            s.send(emb, ids, **extra)
            keep.append((s, emb, ids, extra))  # untouched until the room ends
            encoded += len(needed)
        else:
            keep.append((s,))
    for s, *_ in keep:
        if s.wait(args.timeout) != TransferStatus.SUCCESS:
            print(f"[embedding {ctx.rank}] {name} room {s.room} failed: {s.failure}",
                  flush=True)
            return 1
    print(f"[embedding {ctx.rank}] {name}: encoded {encoded} image(s), skipped {skipped} "
          f"(held by the LLM), sent {ctx.stats()['bytes_sent']} bytes", flush=True)
    return 0


def logits_from_items(model: Any, prompt: list[int], grids: torch.Tensor,
                      res: disagg.EmbeddingResult) -> tuple[torch.Tensor, str | None]:
    """The LLM alone, on the room's rows at the prompt's image places."""
    input_ids = expand(model, prompt, grids)
    image_mask = input_ids[0] == model.config.image_token_id
    if int(image_mask.sum()) != res.embeddings.shape[0]:
        return torch.empty(0), (f"{int(image_mask.sum())} image-pad tokens, "
                                f"{res.embeddings.shape[0]} rows")
    if not torch.equal(res.fill_ids.long(), input_ids[0, image_mask]):
        return torch.empty(0), "fill_ids are not the image-pad id"
    pos, _ = rope_index(model, input_ids, grids)  # positions: the Language side's own
    return llm_logits(model, input_ids, pos, image_mask, res), None


def language_side(ctx: disagg.Context, name: str, model: Any, args: argparse.Namespace,
                  turns: list[tuple[list[int], list[int]]], imgs: Images) -> int:
    q = ctx.language.queue()
    bad: list[str] = []
    hits = 0
    for room, (prompt, indices) in enumerate(turns):
        # one turn after the other, as a chat goes: each turn's images are held
        # (landed, in the item cache) by the time the next turn is added
        q.add(room, items=imgs.items(indices, args.encoders))
        hits += len(q.hits(room))
        deadline = time.monotonic() + args.timeout
        done: list[tuple[int, disagg.EmbeddingResult]] = []
        while not done:
            done, failed = q.step()
            if failed:
                bad += [f"room {r} failed: {why}" for r, why in failed]
                break
            if time.monotonic() > deadline:
                bad.append(f"room {room} timed out")
                break
            time.sleep(0.001)
        for _, res in done:
            grids = torch.cat([imgs.grids[i] for i in indices])
            logits, why = logits_from_items(model, prompt, grids, res)
            if why is None and not torch.equal(
                    logits, reference_logits(model, prompt, [imgs.images[i] for i in indices])):
                why = "logits differ from the monolithic model's"
            if why is not None:
                bad.append(f"room {room}: {why}")
            ctx.language.recycle(res)  # the cache keeps copies of its own
        if bad:
            break
    if bad:
        print(f"[language {ctx.rank}] MISMATCH {name}: {'; '.join(bad)}", flush=True)
        return 1
    st = ctx.stats()
    print(f"[language {ctx.rank}] OK {name}: logits bit-exact for {len(turns)} turns from "
          f"{args.encoders} encoder(s); {hits} of {sum(len(i) for _, i in turns)} images were "
          f"hits (encodes skipped), {st['item_bytes_reused']} bytes not sent",
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=[*MODELS, "all"], default="all",
                   help="which model family (all: each in turn, one context each)")
    p.add_argument("--encoders", type=int, default=1, help="Embedding ranks (fan-in if > 1)")
    p.add_argument("--language-tp-size", type=int, default=1, help="ranks per Language instance")
    p.add_argument("--turns", type=int, default=3, help="turns of the conversation")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the images")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per room")
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    dist.init_process_group("gloo")
    rc = 0
    try:
        for name in MODELS if args.model == "all" else (args.model,):
            model = tiny_model(name, args.seed)
            turns = conversation(model, args.seed, args.turns)
            imgs = Images(name, model, args.seed, args.turns)
            ctx = disagg.init(disagg_config(model, args))
            try:
                side = embedding_side if ctx.role == "embedding" else language_side
                rc |= side(ctx, name, model, args, turns, imgs)
            finally:
                ctx.shutdown()
    finally:
        dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main())
