"""A real model end to end: Hugging Face Qwen2-VL, Qwen2.5-VL and Qwen3-VL split across disagg.

    pip install -e ".[hf]"
    torchrun --standalone --nproc-per-node 2 examples/qwen_vl.py --model qwen3_vl
    torchrun --standalone --nproc-per-node 3 examples/qwen_vl.py --model all --language-tp-size 2

Every rank builds the same tiny model (config built in code, seeded random
weights, bfloat16: nothing is downloaded, it runs on CPU in seconds). Rank 0 is
the Embedding rank: it runs the model's own image processor and only the vision
tower, and sends each request's image rows: `embeddings` (the tower's merged
output), `fill_ids` (the image-pad token id, once per row), `mrope_positions`
(the rows' M-RoPE positions), and in `aux` the M-RoPE delta, the image count and
every image's grid (t, h, w). Qwen3-VL's deepstack features go as one extra
buffer per deepstack layer. The other ranks are Language ranks: from their text
prompt (one image-pad token per image) and the received grids they rebuild the
prompt's ids and positions with the model's own `get_rope_index`, scatter the
received rows into `inputs_embeds`, run only the LLM and lm_head, and compare
the logits with the monolithic model's (`model(input_ids, pixel_values, ...)`,
run in the same process) bit for bit. Each Language rank prints one
`OK <model>` line per model, or `MISMATCH`, and exits non-zero on any mismatch.

With --language-tp-size 2 both ranks of the instance receive every request
(`queue()` keeps them in lockstep) and each runs the whole tiny LLM: the
example checks the transfer and the glue, not a sharded LLM.
docs/real-model.md explains what goes where and why.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import disagg
from disagg import TransferStatus

try:
    import transformers
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
except ImportError as e:  # the optional extra: pip install -e ".[hf]"
    raise SystemExit(f"qwen_vl.py needs transformers and Pillow (pip install -e \".[hf]\"): {e}"
                     ) from e

MODELS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VOCAB = 1024  # tiny vocabulary; the special ids below are placed at its top
SPECIAL_IDS = {"image_token_id": VOCAB - 4, "video_token_id": VOCAB - 3,
               "vision_start_token_id": VOCAB - 2, "vision_end_token_id": VOCAB - 1}
TEXT_IDS = VOCAB - 8  # ordinary text tokens are drawn from [0, TEXT_IDS)


def tiny_model(name: str, seed: int) -> Any:
    """The model `name` at toy size with seeded random weights, in bfloat16.

    Every rank builds it with the same seed, so every rank holds the same
    weights: the Embedding rank uses only `model.model.visual`, the Language
    ranks only `model.model.language_model` and `model.lm_head` (and the whole
    model for the reference logits). A real deployment loads each half of the
    checkpoint on its own side.
    """
    text = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "bos_token_id": None, "eos_token_id": None,
            # head_dim 16: the three M-RoPE sections (t, h, w) split its 8 frequencies
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [2, 3, 3]}}
    if name == "qwen2_vl":
        cls = transformers.Qwen2VLForConditionalGeneration
        cfg = transformers.Qwen2VLConfig(
            text_config=text, vision_config={"depth": 2, "embed_dim": 32, "num_heads": 2,
                                             "mlp_ratio": 2, "hidden_size": 64},
            **SPECIAL_IDS)
    elif name == "qwen2_5_vl":
        cls = transformers.Qwen2_5_VLForConditionalGeneration
        cfg = transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config={"depth": 2, "hidden_size": 32, "num_heads": 2,
                                             "intermediate_size": 64, "out_hidden_size": 64,
                                             "window_size": 56, "fullatt_block_indexes": [1]},
            **SPECIAL_IDS)
    elif name == "qwen3_vl":
        cls = transformers.Qwen3VLForConditionalGeneration
        text["head_dim"] = 16
        text["rope_parameters"]["mrope_interleaved"] = True
        cfg = transformers.Qwen3VLConfig(
            text_config=text, vision_config={"depth": 3, "hidden_size": 32, "num_heads": 2,
                                             "intermediate_size": 64, "out_hidden_size": 64,
                                             "num_position_embeddings": 64,
                                             "deepstack_visual_indexes": [0, 1]},
            **SPECIAL_IDS)
    else:
        raise ValueError(f"unknown model {name!r}; one of {MODELS}")
    torch.manual_seed(seed)
    return cls(cfg).to(torch.bfloat16).eval()


def deepstack_layers(model: Any) -> int:
    """How many deepstack features the vision tower emits (0 before Qwen3-VL)."""
    return len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ())


def disagg_config(model: Any, args: argparse.Namespace) -> disagg.DisaggConfig:
    text = model.config.text_config
    # One extra buffer per deepstack layer, each [seq, hidden] like the embeddings:
    # the tower returns them as a list of separate tensors, so each is sent as it
    # is (no copy); one [seq, layers, hidden] buffer would force a torch.stack.
    extra = {f"deepstack_{i}": ((text.hidden_size,), "bfloat16")
             for i in range(deepstack_layers(model))}
    return disagg.DisaggConfig(
        language_tp_size=args.language_tp_size,
        # The width of one row is the LLM's: text_config.hidden_size (what the rows
        # replace in inputs_embeds). Not vision_config.hidden_size, which on
        # Qwen2.5-VL and Qwen3-VL is the tower's inner width (its merger projects to
        # out_hidden_size == text_config.hidden_size); the top-level config has none.
        hidden_size=text.hidden_size,
        dtype="bfloat16",   # the model's dtype: rows are sent as the tower made them
        mrope=True,         # carry the rows' positions ([3, seq] int32)
        extra_buffers=extra,
        backend="gloo",     # the models run on CPU here, so the tensors are on CPU
        block_size=16, num_blocks=64,
        default_alloc_tokens=16,  # small on purpose: larger rooms take resume rounds
        bootstrap_timeout=args.timeout, peer_timeout=10.0)


def image_processor(model: Any) -> Any:
    """The model's own image processor (the PIL one: no torchvision), sized by
    the vision config; the pixel bounds are small so the toy images stay toy."""
    vc = model.config.vision_config
    factor = vc.patch_size * vc.spatial_merge_size
    # Qwen3-VL's checkpoints normalise with mean = std = 0.5; the others with CLIP's
    norm = ({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
            if model.config.model_type == "qwen3_vl" else {})
    return Qwen2VLImageProcessorPil(
        patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
        merge_size=vc.spatial_merge_size,
        size={"shortest_edge": factor * factor, "longest_edge": 36 * factor * factor}, **norm)


def request(model: Any, seed: int, room: int) -> tuple[list[int], list[Image.Image]]:
    """Request `room`: a text prompt with one image-pad token per image (what a
    text frontend has before the processor expands it) and the images, seeded
    random pixels of different sizes (not multiples of the patch grid, so the
    processor resizes them)."""
    rng = np.random.default_rng([seed, room])
    vc = model.config.vision_config
    factor = vc.patch_size * vc.spatial_merge_size
    cfg = model.config
    prompt = rng.integers(0, TEXT_IDS, 3).tolist()
    images = []
    for _ in range(3 if room % 2 == 0 else 1):  # 3 images: aux is 11 ints, past the 8 in the meta
        h, w = (int(rng.integers(2, 6)) * factor + int(rng.integers(0, factor // 2))
                for _ in range(2))
        images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        prompt += [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id]
        prompt += rng.integers(0, TEXT_IDS, 2).tolist()
    return prompt, images


def expand(model: Any, prompt: list[int], grids: torch.Tensor) -> torch.Tensor:
    """input_ids [1, L] int64 as the model's processor makes them: the i-th
    image-pad token repeated t*h*w / merge**2 times (the i-th image's rows)."""
    pad, merge = model.config.image_token_id, model.config.vision_config.spatial_merge_size
    if prompt.count(pad) != len(grids):
        raise ValueError(f"{prompt.count(pad)} image-pad tokens but {len(grids)} grids")
    it = iter(int(g.prod()) // merge**2 for g in grids)
    ids = [t for tok in prompt for t in ([tok] * next(it) if tok == pad else [tok])]
    return torch.tensor([ids], dtype=torch.long)


def rope_index(model: Any, input_ids: torch.Tensor, grids: torch.Tensor
               ) -> tuple[torch.Tensor, int]:
    """The model's own M-RoPE positions ([3, 1, L] int64) and delta."""
    types = (input_ids == model.config.image_token_id).int()  # text 0, image 1
    pos, delta = model.model.get_rope_index(input_ids, mm_token_type_ids=types,
                                            image_grid_thw=grids)
    return pos, int(delta.reshape(-1)[0])


def embedding_side(ctx: disagg.Context, name: str, model: Any, args: argparse.Namespace) -> int:
    proc = image_processor(model)
    keep = {}  # every room's tensors stay alive and untouched until the room ends
    for room in range(args.requests):
        prompt, images = request(model, args.seed, room)
        px = proc(images=images, return_tensors="pt")
        grids = px["image_grid_thw"]  # [images, 3] int64: t, h, w in patches
        with torch.no_grad():  # the vision tower only
            out = model.model.visual(px["pixel_values"].to(model.dtype), grid_thw=grids)
        emb = out.pooler_output  # [rows, text hidden] bf16, contiguous: sent with no copy
        n = emb.shape[0]
        # The library's ids are int32 (token ids fit; packed with the positions into
        # one [seq, 4] int32 wire buffer); the model's are int64.
        ids = torch.full((n,), model.config.image_token_id, dtype=torch.int32)
        input_ids = expand(model, prompt, grids)
        pos, delta = rope_index(model, input_ids, grids)
        # get_rope_index gives [3, batch=1, L] int64 over the whole prompt; the room
        # carries the image rows only, as [3, rows] int32 (positions are small).
        rows = pos[:, 0, input_ids[0] == model.config.image_token_id].to(torch.int32)
        aux = (delta, len(grids), *grids.flatten().tolist())  # at most 1024 ints
        extra = {f"deepstack_{i}": d for i, d in enumerate(getattr(out, "deepstack_features",
                                                                     None) or ())}
        s = ctx.embedding.sender(room)
        s.send(emb, ids, rows, aux=aux, **extra)
        keep[room] = (s, emb, ids, rows, extra)
    for room, (s, *_) in keep.items():
        if s.wait(args.timeout) != TransferStatus.SUCCESS:
            print(f"[embedding {ctx.rank}] {name} room {room} failed: {s.failure}", flush=True)
            return 1
    print(f"[embedding {ctx.rank}] {name}: sent {args.requests} requests "
          f"({deepstack_layers(model)} deepstack buffers)", flush=True)
    return 0


def language_logits(model: Any, prompt: list[int], res: disagg.EmbeddingResult
                    ) -> tuple[torch.Tensor, str | None]:
    """Logits from the received rows and the LLM alone, or why the room disagrees."""
    cfg = model.config
    delta, n_images, *flat = res.aux
    grids = torch.tensor(flat, dtype=torch.long).view(n_images, 3)
    input_ids = expand(model, prompt, grids)  # the prompt, expanded by the received grids
    image = input_ids[0] == cfg.image_token_id
    if int(image.sum()) != res.embeddings.shape[0]:
        return torch.empty(0), f"{int(image.sum())} image-pad tokens, {res.embeddings.shape[0]} rows"
    if not torch.equal(res.fill_ids.long(), input_ids[0, image]):
        return torch.empty(0), "fill_ids are not the image-pad id"
    pos, my_delta = rope_index(model, input_ids, grids)  # the model's own rope-index code
    if my_delta != delta or not torch.equal(pos[:, 0, image], res.mrope_positions.long()):
        return torch.empty(0), "M-RoPE positions or delta differ from the Embedding side's"
    return llm_logits(model, input_ids, pos, image, res), None


def llm_logits(model: Any, input_ids: torch.Tensor, pos: torch.Tensor, image: torch.Tensor,
               res: disagg.EmbeddingResult) -> torch.Tensor:
    """The LLM and lm_head alone: the received rows scattered into the prompt's
    embeddings at its image-pad places (`image`, [L] bool), deepstack as extras."""
    mask = image[None]  # [1, L]
    with torch.no_grad():  # the LLM only
        embeds = model.get_input_embeddings()(input_ids)
        embeds = embeds.masked_scatter(mask[..., None], res.embeddings)
        kw = {}
        if deepstack_layers(model):
            kw = {"visual_pos_masks": mask,
                  "deepstack_visual_embeds": [res.extra[f"deepstack_{i}"]
                                              for i in range(deepstack_layers(model))]}
        hidden = model.model.language_model(inputs_embeds=embeds, position_ids=pos,
                                            **kw).last_hidden_state
        return model.lm_head(hidden)


def reference_logits(model: Any, prompt: list[int], images: list[Image.Image]) -> torch.Tensor:
    """The monolithic model over the processor's output, as a user would run it."""
    px = image_processor(model)(images=images, return_tensors="pt")
    input_ids = expand(model, prompt, px["image_grid_thw"])
    with torch.no_grad():
        return model(input_ids=input_ids, pixel_values=px["pixel_values"],
                     image_grid_thw=px["image_grid_thw"],
                     mm_token_type_ids=(input_ids == model.config.image_token_id).int()).logits


def language_side(ctx: disagg.Context, name: str, model: Any, args: argparse.Namespace) -> int:
    q = ctx.language.queue()  # every TP rank: the same rooms, in the same order
    for room in range(args.requests):
        q.add(room, src_rank=0)  # no seq_len: the row count comes with the grids
    bad: list[str] = []
    tokens = rows = 0
    deadline = time.monotonic() + args.timeout
    while len(q):
        done, failed = q.step()
        bad += [f"room {room} failed: {why}" for room, why in failed]
        for room, res in done:
            prompt, images = request(model, args.seed, room)
            try:
                logits, why = language_logits(model, prompt, res)
            except (ValueError, RuntimeError) as e:  # aux that does not fit the prompt
                why = f"{type(e).__name__}: {e}"
            if why is None and not torch.equal(logits, reference_logits(model, prompt, images)):
                why = "logits differ from the monolithic model's"
            if why is not None:
                bad.append(f"room {room}: {why}")
                continue
            tokens += logits.shape[1]
            rows += res.embeddings.shape[0]
        if time.monotonic() > deadline:
            bad.append("timed out")
            break
        time.sleep(0.001)
    if bad:
        print(f"[language {ctx.rank}] MISMATCH {name}: {'; '.join(bad)}", flush=True)
        return 1
    print(f"[language {ctx.rank}] OK {name}: logits bit-exact for {args.requests} requests "
          f"({tokens} tokens, {rows} image rows, {deepstack_layers(model)} deepstack buffers, "
          f"{ctx.stats()['resumes']} resume rounds)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=[*MODELS, "all"], default="all",
                   help="which model family (all: each in turn, one context each)")
    p.add_argument("--language-tp-size", type=int, default=1,
                   help="ranks per Language instance (world = 1 + instances * this)")
    p.add_argument("--requests", type=int, default=2, help="requests (rooms) per model")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the requests")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per model")
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    # One world for every model's context: disagg.init reuses it, and each context's
    # shutdown leaves it up for the next one.
    dist.init_process_group("gloo")
    rc = 0
    try:
        for name in MODELS if args.model == "all" else (args.model,):
            model = tiny_model(name, args.seed)
            ctx = disagg.init(disagg_config(model, args))
            try:
                side = embedding_side if ctx.role == "embedding" else language_side
                rc |= side(ctx, name, model, args)
            finally:
                ctx.shutdown()
    finally:
        dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main())
