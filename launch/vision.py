"""A small Qwen2-VL-style vision encoder with seeded random weights, and the
synthetic requests the demo feeds it (used by `launch.demo`; not an entry
point). Nothing is downloaded.

What is kept from Qwen2-VL: 14-px patches; pre-norm ViT blocks with 2-D rotary
position embedding (row, column) and full attention within each image; a 2x2
spatial merge (the 4 neighbouring patches concatenated, LayerNorm, 2-layer MLP)
to the LLM's `hidden_size`, so an H x W image gives (H/28) * (W/28) tokens;
the image-pad token id; and the M-RoPE positions that
`Qwen2VLForConditionalGeneration.get_rope_index` gives the image tokens.

What is simplified: one frame per image (a Linear over the 14x14 patch instead
of Conv3d over 2 duplicated frames: the same token count); a small width and
depth; no pixel resizing or normalisation (images are seeded noise at sizes
that are already multiples of 28); text tokens are only counted, never encoded.

Computed in float32 on CPU, cast to bfloat16 at the end: with a fixed thread
count the output is bit-identical for the same (seed, room) in any process.

Legend: P = patches of one image, N = merged tokens, D = vision width,
H = hidden_size, d = head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PATCH = 14
MERGE = 2  # 2x2 patches -> one LLM token
TOKEN_PX = PATCH * MERGE  # 28: an image side must be a multiple of this
IMAGE_PAD_ID = 151655  # Qwen2-VL <|image_pad|>
PREFIX_TEXT_TOKENS = 20  # system prompt + "<|im_start|>user\n" before the first image


@dataclass(frozen=True)
class Request:
    """One request: images [3, h, w] and the text around them.

    Layout (as Qwen2-VL's chat template lays it out): `prefix_len` text tokens,
    then per image <|vision_start|> pads <|vision_end|>, then `suffix_len` text
    tokens of question and "<|im_start|>assistant\\n".
    """

    room: int
    images: tuple[torch.Tensor, ...]
    prefix_len: int
    suffix_len: int

    @property
    def grids_thw(self) -> list[tuple[int, int, int]]:
        """Patch grid per image, in patches, as Qwen2-VL's `image_grid_thw`."""
        return [(1, img.shape[1] // PATCH, img.shape[2] // PATCH) for img in self.images]

    @property
    def num_tokens(self) -> int:
        return sum(image_tokens(img.shape[1], img.shape[2]) for img in self.images)

    def text_lens(self) -> tuple[list[int], int]:
        """Text tokens before each image and after the last one."""
        before = [self.prefix_len + 1] + [2] * (len(self.images) - 1)  # </vs> <vs> between
        return before, 1 + self.suffix_len


def image_tokens(height: int, width: int) -> int:
    if height % TOKEN_PX or width % TOKEN_PX or height <= 0 or width <= 0:
        raise ValueError(f"image {height}x{width}: sides must be positive multiples of {TOKEN_PX}")
    return (height // TOKEN_PX) * (width // TOKEN_PX)


def synthetic_request(seed: int, room: int, *, min_images: int = 1, max_images: int = 3,
                      min_size: int = 112, max_size: int = 896) -> Request:
    """1..N noise images with sides drawn from multiples of 28 in [min_size, max_size].

    Seeded by (seed, room) only, so any rank regenerates the same request.
    """
    lo, hi = -(-min_size // TOKEN_PX), max_size // TOKEN_PX
    if not (1 <= lo <= hi and 1 <= min_images <= max_images):
        raise ValueError(f"need 28 <= min_size <= max_size (a multiple of 28 between) and "
                         f"1 <= min_images <= max_images, got sizes {min_size}..{max_size}, "
                         f"images {min_images}..{max_images}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + room)
    n = int(torch.randint(min_images, max_images + 1, (1,), generator=g))
    images = []
    for _ in range(n):
        h, w = (int(v) * TOKEN_PX for v in torch.randint(lo, hi + 1, (2,), generator=g))
        images.append(torch.randn(3, h, w, generator=g))
    suffix = int(torch.randint(5, 41, (1,), generator=g))
    return Request(room, tuple(images), PREFIX_TEXT_TOKENS, suffix)


def fill_ids(num_tokens: int) -> torch.Tensor:
    return torch.full((num_tokens,), IMAGE_PAD_ID, dtype=torch.int32)


def mrope_positions(grids_thw: list[tuple[int, int, int]], text_before: list[int],
                    text_after: int) -> tuple[torch.Tensor, int]:
    """M-RoPE (t, h, w) positions [3, N] int32 of the image tokens, and
    `mrope_position_delta`, as Qwen2-VL's get_rope_index computes them.

    A text run starts at the previous max position + 1 and counts up in all
    three rows; an image after it sits at that start + the run's length, with t
    constant and h, w the row and column in the merged grid.
    """
    pos_3n: list[torch.Tensor] = []
    next_pos = 0  # max position so far + 1
    for (t, gh, gw), text_len in zip(grids_thw, text_before, strict=True):
        h, w = gh // MERGE, gw // MERGE
        base = next_pos + text_len
        t_idx = torch.arange(t).view(-1, 1).expand(-1, h * w).flatten()
        h_idx = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten()
        w_idx = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten()
        img = torch.stack([t_idx, h_idx, w_idx]) + base
        pos_3n.append(img)
        next_pos = int(img.max()) + 1
    max_pos = next_pos - 1 + text_after  # the trailing text run counts up from next_pos
    seq_len = sum(text_before) + text_after + sum(p.shape[1] for p in pos_3n)
    return torch.cat(pos_3n, dim=1).to(torch.int32), max_pos + 1 - seq_len


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x_PD: torch.Tensor, cos_Pd: torch.Tensor, sin_Pd: torch.Tensor
                ) -> torch.Tensor:
        p, dim = x_PD.shape
        qkv = self.qkv(self.norm1(x_PD)).view(p, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(1, 2, 0, 3)  # each [heads, P, d]
        q = q * cos_Pd + _rotate_half(q) * sin_Pd
        k = k * cos_Pd + _rotate_half(k) * sin_Pd
        attn = F.scaled_dot_product_attention(q, k, v)  # full attention within the image
        x_PD = x_PD + self.proj(attn.transpose(0, 1).reshape(p, dim))
        fc1 = self.fc1(self.norm2(x_PD))
        return x_PD + self.fc2(fc1 * torch.sigmoid(1.702 * fc1))  # QuickGELU, as Qwen2-VL


class VisionEncoder(nn.Module):
    """images [3, h, w] -> embeddings [N, hidden_size] bf16, N = sum (h/28)(w/28)."""

    def __init__(self, hidden_size: int, *, depth: int = 2, width: int = 64,
                 num_heads: int = 2, seed: int = 0) -> None:
        super().__init__()
        if width % (num_heads * 4):
            raise ValueError(f"width {width} must split into {num_heads} heads of a multiple of 4")
        self.head_dim = width // num_heads
        self.patch_embed = nn.Linear(3 * PATCH * PATCH, width, bias=False)
        self.blocks = nn.ModuleList(_Block(width, num_heads) for _ in range(depth))
        self.merge_norm = nn.LayerNorm(width, eps=1e-6)
        self.merge_fc1 = nn.Linear(4 * width, 4 * width)
        self.merge_fc2 = nn.Linear(4 * width, hidden_size)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # seeded weights, independent of the global RNG
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
                else:
                    p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        self.eval()

    def _rope(self, gh: int, gw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [P, d] in merge-window patch order: half the rotary dims
        follow the patch row, half the column."""
        quarter = self.head_dim // 4
        inv_freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
        rows = torch.arange(gh).view(-1, 1).expand(gh, gw)
        cols = torch.arange(gw).view(1, -1).expand(gh, gw)
        hw_P2 = torch.stack([_merge_order(rows, gh, gw), _merge_order(cols, gh, gw)], dim=1)
        freqs = (hw_P2.unsqueeze(-1).float() * inv_freq).flatten(1)  # [P, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        image_tokens(height, width)
        gh, gw = height // PATCH, width // PATCH
        # [3, gh, 14, gw, 14] -> patches [gh, gw, 3*14*14] -> merge-window order
        patches = image.view(3, gh, PATCH, gw, PATCH).permute(1, 3, 0, 2, 4).flatten(2)
        x_PD = self.patch_embed(_merge_order(patches, gh, gw))
        cos, sin = self._rope(gh, gw)
        for block in self.blocks:
            x_PD = block(x_PD, cos, sin)
        x_N4D = self.merge_norm(x_PD).view(-1, 4 * x_PD.shape[1])  # 4 neighbours side by side
        return self.merge_fc2(F.gelu(self.merge_fc1(x_N4D)))

    @torch.inference_mode()
    def forward(self, images: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        emb_NH = torch.cat([self.encode_image(img.float()) for img in images])
        return emb_NH.to(torch.bfloat16)


def _merge_order(grid: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """[gh, gw, ...] -> [gh*gw, ...] ordered so each 2x2 merge window's patches are
    consecutive (row-major windows, row-major inside), as Qwen2-VL's processor."""
    rest = grid.shape[2:]
    g = grid.reshape(gh // MERGE, MERGE, gw // MERGE, MERGE, *rest).transpose(1, 2)
    return g.reshape(gh * gw, *rest)
