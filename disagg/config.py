"""`DisaggConfig`: one keyword-only dataclass, validated on construction.

Every rank of a job builds the same config; the role split and pool geometry
derive from it (see `geometry.py`), and `init` checks at start-up that every
rank agrees on the geometry.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .wire import MAX_BLOCKS_PER_MESSAGE

# Names accepted for `dtype` and for extra buffers' dtypes.
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
}

# `dtype`, the embeddings': floating types only (an LLM's inputs_embeds)
EMBEDDING_DTYPES = ("bfloat16", "float16", "float32", "float64")
RESERVED_BUFFERS = ("embeddings", "fill_ids", "mrope_positions")
RECV_INTO = ("output", "pool")
BACKENDS = (None, "gloo", "nccl")
FANOUTS = ("copy", "scatter")


def _bad(field_name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"DisaggConfig.{field_name}={value!r}: {why}")


@dataclass(frozen=True, kw_only=True)
class DisaggConfig:
    """Every rank of a job builds the same config (keyword-only, validated on
    construction: a bad value is a `ValueError` naming the field). Fields, with
    their defaults, are listed below (`help(DisaggConfig)`)."""

    num_embedding_ranks: int = 1
    """Ranks [0, num_embedding_ranks) run the encoder and send."""

    language_tp_size: int = 1
    """Language instances are groups of this many consecutive ranks after the
    Embedding ranks; every rank of an instance ends with the whole room: with
    fanout="copy" each receives all of it, with fanout="scatter" each receives
    its slice and `queue().step()` all-gathers them."""

    hidden_size: int = 3584
    """Width of one embedding row."""

    dtype: str = "bfloat16"
    """Embedding dtype, by name: a floating type (`EMBEDDING_DTYPES`); extra
    buffers may also be integer (`DTYPES`)."""

    block_size: int = 128
    """Tokens per block; allocation is always in whole blocks."""

    num_blocks: int = 256
    """Blocks in each rank's pool (Language: landing space / credit;
    Embedding: budget of unfinished tokens)."""

    default_alloc_tokens: int | Literal["auto"] = 8192
    """First allocation of a room, in tokens (rounded up to whole blocks), or
    "auto" to learn it from a high quantile of recent lengths."""

    auto_resume: bool = True
    """The receiver thread allocates and sends RESUME itself as soon as it
    learns a chunk is partial; `needs_resume` then shows only when it could
    not get blocks."""

    mrope: bool = True
    """Carry `mrope_positions` ([3, seq] int32)."""

    extra_buffers: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    """name -> (per-token shape, dtype name) of optional extra buffers."""

    recv_into: Literal["output", "pool"] = "output"
    """Where a Language rank lands payload: "output" receives straight into the
    room's result tensors (no copy; the pool is flow-control credit and holds
    no memory). "pool": a room's first chunk lands in preallocated pool blocks
    (promised before seq_len is known) and is copied out; every later chunk
    goes straight into the result, its blocks being credit that bounds what is
    in flight."""

    fanout: Literal["copy", "scatter"] = "copy"
    """How a TP instance's Language ranks get a room. "copy": each receives the
    whole room from the Embedding rank (T copies of every byte leave it).
    "scatter": rank i of a TP-T instance receives only its token slice
    [i*c, min((i+1)*c, seq_len)) with c = ceil(seq_len / T), and `queue().step()`
    all-gathers the slices over the instance's own group (NCCL on GPU, so
    NVLink; Gloo on CPU): every byte leaves the Embedding rank once. Needs
    `queue()` on Language ranks; every rank of an instance must use the same
    value (checked at init); instances may differ."""

    backend: Literal["gloo", "nccl"] | None = None
    """None: NCCL when every rank has its own GPU, else Gloo."""

    host: str | None = None
    """Address other ranks use to reach this rank's ZeroMQ socket (None: detected)."""

    bootstrap_timeout: float = 300.0
    """Seconds a room may wait for its ALLOC, or for data, before it fails."""

    peer_timeout: float = 10.0
    """Seconds after which a silent or dead peer is declared dead."""

    step_timeout: float = 120.0
    """Seconds one TP rank of an instance may lag the others in `queue().step()`
    (a first-batch compile, a long GC pause) before the instance's agreement
    gives up: `LockstepError` on every rank, every queued room failed. Its own
    bound, apart from peer_timeout, so a slow step does not end the instance."""

    slow_room_s: float | None = 10.0
    """Rooms slower than this from receiver() to SUCCESS are logged with their
    stage timings (Language side); None: never."""

    item_cache_bytes: int = 0
    """Per Language rank: bytes of landed items kept by key, in the room's device
    memory, for later rooms that declare the same items (least recently used
    out first; 0: off). See docs/items.md."""

    max_pairs: int = 24
    """Live pair groups per rank at most. A pair is made when a room first needs
    it; at the cap the least recently used idle pair is closed first (never one
    with a live room or a frame owed), and a room waits for one to idle. On GPU
    each pair's communicator takes memory, threads and one of the 32 CUDA
    streams torch pools per device: keep it below 32. See docs/deployment.md."""

    pair_idle_s: float = 300.0
    """A pair group idle (no live room, nothing owed) this long is closed; it is
    made again when a room needs it."""

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _bad(name, v, "must be an int >= 1")

        for name in ("num_embedding_ranks", "language_tp_size", "hidden_size",
                     "block_size", "num_blocks", "max_pairs"):
            positive_int(name)
        if self.num_blocks > MAX_BLOCKS_PER_MESSAGE:
            # a first allocation may take the whole pool, and one ALLOC must carry it
            raise _bad("num_blocks", self.num_blocks,
                       f"must be at most {MAX_BLOCKS_PER_MESSAGE} (the block ids one ALLOC "
                       f"can carry); use a larger block_size for the same memory")
        if self.dtype not in EMBEDDING_DTYPES:
            raise _bad("dtype", self.dtype, f"must be a floating type, one of "
                                            f"{list(EMBEDDING_DTYPES)} (embeddings)")
        d = self.default_alloc_tokens
        if d != "auto" and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise _bad("default_alloc_tokens", d, 'must be an int >= 1 or "auto"')
        for name in ("auto_resume", "mrope"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "must be a bool")
        if self.recv_into not in RECV_INTO:
            raise _bad("recv_into", self.recv_into, f"must be one of {RECV_INTO}")
        if self.fanout not in FANOUTS:
            raise _bad("fanout", self.fanout, f"must be one of {FANOUTS}")
        if self.backend not in BACKENDS:
            raise _bad("backend", self.backend, 'must be None, "gloo" or "nccl"')
        if self.host is not None and (not isinstance(self.host, str) or not self.host
                                      or self.host == "0.0.0.0"):
            raise _bad("host", self.host, "must be a routable address or None")
        for name in ("bootstrap_timeout", "peer_timeout", "step_timeout", "pair_idle_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise _bad(name, v, "must be a number of seconds > 0")
        if self.slow_room_s is not None and (isinstance(self.slow_room_s, bool) or not isinstance(
                self.slow_room_s, (int, float)) or not self.slow_room_s > 0):
            raise _bad("slow_room_s", self.slow_room_s, "must be a number of seconds > 0 or None")
        v = self.item_cache_bytes
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _bad("item_cache_bytes", v, "must be an int >= 0 (0: no item cache)")
        self._check_extra_buffers()

    def _check_extra_buffers(self) -> None:
        if not isinstance(self.extra_buffers, dict):
            raise _bad("extra_buffers", self.extra_buffers, "must be a dict")
        for name, spec in self.extra_buffers.items():
            if not isinstance(name, str) or not name.isidentifier() or name in RESERVED_BUFFERS:
                raise _bad("extra_buffers", name,
                           f"buffer names must be identifiers other than {RESERVED_BUFFERS}")
            ok = (isinstance(spec, (tuple, list)) and len(spec) == 2
                  and isinstance(spec[0], (tuple, list))
                  and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                          for n in spec[0])
                  and spec[1] in DTYPES)
            if not ok:
                raise _bad("extra_buffers", {name: spec},
                           "each value must be (per-token shape of ints >= 1, dtype name)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def replace(self, **changes: Any) -> DisaggConfig:
        return dataclasses.replace(self, **changes)


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of `cls`, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _document_fields(cls: type) -> None:
    """Append each field's default and docstring to the class docstring, so
    `help(DisaggConfig)` shows what every field means."""
    try:
        docs = _field_docs(cls)
    except (OSError, TypeError):  # no source (e.g. a frozen app): keep the short docstring
        return
    lines = []
    for f in dataclasses.fields(cls):
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else None)
        text = textwrap.indent(docs.get(f.name, ""), "        ")
        lines.append(f"    {f.name} (default {default!r}):\n{text}")
    cls.__doc__ = (cls.__doc__ or "") + "\n\n    Fields:\n\n" + "\n".join(lines) + "\n"


_document_fields(DisaggConfig)
