"""The demo pipeline (`launch.demo`, `launch.vision`), cheapest layer first:
the encoder and M-RoPE arithmetic in this process, then `--help`, then the demo
as a user runs it (torchrun, three real ranks on Gloo, small settings).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `launch` is not an installed package
    sys.path.insert(0, str(ROOT))
vision = importlib.import_module("launch.vision")

SMALL = ["--requests", "6", "--min-size", "56", "--max-size", "224", "--hidden-size", "64",
         "--depth", "1", "--block-size", "16", "--num-blocks", "64",
         "--default-alloc-tokens", "32", "--timeout", "60", "--no-progress"]
FLAGS = ("--requests", "--min-images", "--max-images", "--min-size", "--max-size",
         "--hidden-size", "--depth", "--block-size", "--num-blocks", "--default-alloc-tokens",
         "--max-in-flight", "--num-embedding-ranks", "--language-tp-size", "--seed", "--timeout",
         "--corrupt-room", "--no-progress")


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- launch.vision


@pytest.mark.parametrize(("height", "width", "tokens"),
                         [(28, 28, 1), (56, 84, 6), (112, 896, 128), (896, 896, 1024)])
def test_token_count_is_merged_grid(height: int, width: int, tokens: int) -> None:
    assert vision.image_tokens(height, width) == tokens
    enc = vision.VisionEncoder(32, depth=1)
    emb = enc([torch.randn(3, height, width)])
    assert emb.shape == (tokens, 32) and emb.dtype == torch.bfloat16


@pytest.mark.parametrize(("height", "width"), [(14, 28), (28, 42), (0, 28)])
def test_sides_must_be_multiples_of_28(height: int, width: int) -> None:
    with pytest.raises(ValueError, match="multiples of 28"):
        vision.image_tokens(height, width)


def test_mrope_two_images_by_hand() -> None:
    # text [0 1 2] | image 1: merged grid 2x2 at base 3 | text [5 6] |
    # image 2: merged grid 1x3 at base 7 | text [10 11 12 13]; 16 tokens in all
    pos, delta = vision.mrope_positions([(1, 4, 4), (1, 2, 6)], [3, 2], 4)
    assert pos.dtype == torch.int32
    assert pos.tolist() == [[3, 3, 3, 3, 7, 7, 7],
                            [3, 3, 4, 4, 7, 7, 7],
                            [3, 4, 3, 4, 7, 8, 9]]
    assert delta == 13 + 1 - 16


def test_request_layout_and_fill_ids() -> None:
    req = vision.synthetic_request(0, 5, min_images=2, max_images=2, min_size=56, max_size=56)
    assert [tuple(im.shape) for im in req.images] == [(3, 56, 56)] * 2
    before, after = req.text_lens()
    assert before == [vision.PREFIX_TEXT_TOKENS + 1, 2] and after == 1 + req.suffix_len
    pos, delta = vision.mrope_positions(req.grids_thw, before, after)
    p = vision.PREFIX_TEXT_TOKENS + 1  # first image's t index
    assert pos[:, :4].tolist() == [[p] * 4, [p, p, p + 1, p + 1], [p, p + 1, p, p + 1]]
    assert pos[0, 4:].tolist() == [p + 4] * 4  # </vs> <vs> at p+2, p+3
    seq_len = sum(before) + after + req.num_tokens
    assert delta == (p + 5 + after + 1) - seq_len  # max: last text token after max p+5
    ids = vision.fill_ids(req.num_tokens)
    assert ids.dtype == torch.int32 and bool((ids == vision.IMAGE_PAD_ID).all())


def test_requests_are_seeded_and_varied() -> None:
    a = vision.synthetic_request(3, 17)
    b = vision.synthetic_request(3, 17)
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images, strict=True))
    counts = {vision.synthetic_request(0, r).num_tokens for r in range(32)}
    assert min(counts) < 100 and max(counts) > 1000


def _encoder_digest() -> str:
    req = vision.synthetic_request(1, 2, min_size=56, max_size=280)
    emb = vision.VisionEncoder(64, depth=2, seed=7)(req.images)
    return hashlib.blake2b(emb.view(torch.int16).numpy().tobytes(), digest_size=8).hexdigest()


def test_encoder_is_bit_identical_across_calls_and_processes(one_thread: None) -> None:
    here = _encoder_digest()
    assert _encoder_digest() == here
    code = ("import sys, torch; torch.set_num_threads(1); sys.path.insert(0, 'tests'); "
            "from test_demo import _encoder_digest; print(_encoder_digest())")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == here


# ---------------------------------------------------------------- launch.demo


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
         "-m", "launch.demo", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)


def test_help_documents_every_flag() -> None:
    p = subprocess.run([sys.executable, "-m", "launch.demo", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for flag in FLAGS:
        assert flag in p.stdout, flag
    assert "(default: 32)" in p.stdout


def test_demo_runs_and_prints_summary() -> None:
    p = torchrun(*SMALL)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "[embedding rank 0] OK: 6 requests" in p.stdout, out
    assert "language instance 0 (ranks 1..2, TP 2): OK" in p.stdout, out
    for row in ("requests     6/6 verified, 0 mismatched, 0 failed", "tokens", "bytes moved",
                "throughput", "latency p50", "latency p99", "resumes", "failures     0"):
        assert row in p.stdout, row
    assert "MISMATCH" not in out


def test_corrupted_room_is_caught() -> None:
    p = torchrun(*SMALL, "--corrupt-room", "4")
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert p.stderr.count("room 4: MISMATCH: checksum") == 2, out  # both TP ranks check
    assert "requests     5/6 verified, 1 mismatched, 0 failed" in p.stdout, out
