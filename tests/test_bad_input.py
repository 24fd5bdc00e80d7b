"""Bad-input tests: the whole library, on real ranks (Gloo over 127.0.0.1),
fed wrong arguments and hostile control traffic.

Layer: public API + wire protocol, end to end. Nothing here reaches into the
engines except to *inject* traffic: raw ZeroMQ DEALERs aimed at the Embedding
rank's ROUTER, and a wrapper around the genuine Language rank's control
`post` that rewrites one room's ALLOC/RESUME on its way out.

For every bad input we check three things:
  * the precise exception type, with a message naming what was wrong, or the
    room ends FAILED (on both ranks where the room exists on both) with a
    reason naming the problem;
  * an ordinary room sent right after still arrives bit-exact (the sender,
    the control thread and the pair stream all survived);
  * at the end every pool is whole: pool_free_blocks == pool_total_blocks and
    rooms_live == 0 on both ranks.

Process start-up is the expensive part (~2.5 s per rank), so each spawned run
walks a whole list of cases in lockstep on both ranks (synchronised through
the c10d store, every wait bounded) and returns a dict of outcomes that the
test functions below assert on.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import spawn

import disagg
from disagg import TransferStatus, wire

pytestmark = pytest.mark.timeout(120)

HIDDEN = 64
BS = 16
NBLOCKS = 8  # Embedding budget and Language pool: 128 tokens each
ALLOC = 64  # default first allocation on the Language side (4 blocks)
TERMINAL = (TransferStatus.SUCCESS, TransferStatus.FAILED)
WAIT_S = 15.0


def _cfg(**kw: Any) -> disagg.DisaggConfig:
    base: dict[str, Any] = dict(hidden_size=HIDDEN, block_size=BS, num_blocks=NBLOCKS,
                                default_alloc_tokens=ALLOC, backend="gloo",
                                bootstrap_timeout=20.0, peer_timeout=5.0)
    base.update(kw)
    return disagg.DisaggConfig(**base)


# ---------------------------------------------------------------- helpers (in ranks)

def _seq(room: int) -> int:
    """Length of an ordinary room: 1..100 tokens, some needing a resume (> ALLOC)."""
    return 1 + (room * 37) % 100


def _data(room: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(room)
    emb = torch.randn(seq, HIDDEN, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 1 << 30, (seq,), generator=g, dtype=torch.int32)
    mrope = torch.randint(0, 1 << 20, (3, seq), generator=g, dtype=torch.int32)
    return emb, ids, mrope


def _aux(room: int) -> tuple[int, ...]:
    return (room, -room - 1)


def _wait(cond: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.002)


def _raises(fn: Callable[[], Any]) -> tuple[str, str] | None:
    """(qualified exception type, message) of what fn raised, or None."""
    try:
        fn()
    except Exception as e:
        return f"{type(e).__module__}.{type(e).__qualname__}", str(e)
    return None


class _Sync:
    """Rendezvous and small values through the c10d store; every wait bounded."""

    def __init__(self) -> None:
        self.store = dist.distributed_c10d._get_default_store()

    def put(self, key: str, value: Any = True) -> None:
        self.store.set(f"test/{key}", json.dumps(value))

    def get(self, key: str, timeout: float = 30.0) -> Any:
        self.store.wait([f"test/{key}"], datetime.timedelta(seconds=timeout))
        return json.loads(self.store.get(f"test/{key}"))


def _failures(ctx: Any, cause: str) -> int:
    return int(ctx.stats()["failures_by_cause"].get(cause, 0))


def _pool_whole(ctx: Any) -> bool:
    s = ctx.stats()
    return s["pool_free_blocks"] == s["pool_total_blocks"] and s["rooms_live"] == 0


def _finish_send(s: Any, timeout: float = WAIT_S) -> dict[str, Any]:
    (st,) = _wait(lambda: (s.poll(),) if s.poll() in TERMINAL else None,
                  f"room {s.room} to end (embedding)", timeout)
    return {"status": st.name, "failure": s.failure}


def _send_room(ctx: Any, room: int) -> dict[str, Any]:
    s = ctx.embedding.sender(room)
    emb, ids, mrope = _data(room, _seq(room))
    s.send(emb, ids, mrope, aux=_aux(room))
    return _finish_send(s)


def _finish_recv(ctx: Any, r: Any, seq: int | None, timeout: float = WAIT_S) -> dict[str, Any]:
    def ended() -> Any:
        st = r.poll()
        if st in TERMINAL:
            return (st,)  # a tuple: FAILED == 0 is falsy
        if r.needs_resume:
            r.resume()
        return None

    (st,) = _wait(ended, f"room {r.room} to end (language)", timeout)
    out: dict[str, Any] = {"status": st.name, "failure": r.failure}
    if st is TransferStatus.SUCCESS and seq is not None:
        res = r.result()
        emb, ids, mrope = _data(r.room, seq)
        out["exact"] = bool(
            torch.equal(res.embeddings.view(torch.int16), emb.view(torch.int16))
            and torch.equal(res.fill_ids, ids) and res.mrope_positions is not None
            and torch.equal(res.mrope_positions, mrope) and res.aux == _aux(r.room))
    # the room's blocks come back once nothing more can land in them
    _wait(lambda: ctx.stats()["rooms_live"] == 0, f"room {r.room} to be released")
    out["pool_whole"] = _pool_whole(ctx)
    return out


def _recv_room(ctx: Any, room: int, num_tokens: int | None = None,
               seq: int | None = None) -> dict[str, Any]:
    r = ctx.language.receiver(room, src_rank=0)
    _wait(lambda: r.init(num_tokens) or r.poll() is TransferStatus.FAILED,
          f"room {room} init")
    return _finish_recv(ctx, r, _seq(room) if seq is None else seq)


# ---------------------------------------------------------------- case tables

def _send_case(name: str, seq: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments of a bad send(); the matching good data is _data(room, _seq(room))."""
    emb, ids, mrope = _data(1, seq)
    kw: dict[str, Any] = {}
    if name == "hidden_size":
        emb = torch.zeros(seq, HIDDEN + 1, dtype=torch.bfloat16)
    elif name == "float32_embeddings":
        emb = emb.float()
    elif name == "embeddings_1d":
        emb = emb.reshape(-1)
    elif name == "embeddings_3d":
        emb = emb.reshape(1, seq, HIDDEN)
    elif name == "embeddings_not_tensor":
        emb = emb.tolist()
    elif name == "embeddings_not_contiguous":
        emb = torch.zeros(HIDDEN, seq, dtype=torch.bfloat16).t()
    elif name == "fill_ids_length":
        ids = ids[:-1]
    elif name == "fill_ids_int64":
        ids = ids.long()
    elif name == "mrope_shape":
        mrope = mrope.t().contiguous()  # [seq, 3] instead of [3, seq]
    elif name == "mrope_missing":
        mrope = None
    elif name == "seq_0":
        emb, ids, mrope = emb[:0], ids[:0], mrope[:, :0]
    elif name == "seq_over_budget":
        emb, ids, mrope = _data(1, NBLOCKS * BS + 1)
    elif name == "unknown_extra":
        kw["deepstack"] = torch.zeros(seq, 4, dtype=torch.bfloat16)
    elif name == "aux_too_long":
        kw["aux"] = tuple(range(wire.MAX_AUX + 1))
    else:
        raise AssertionError(name)
    return (emb, ids, mrope), kw


# name -> substrings the ValueError message must contain (rooms are numbered from
# SEND_ROOM0 in this order: send(room=100) is "hidden_size", ...)
SEND_CASES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("send(room=100)", "embeddings", "shape", f"{HIDDEN + 1}]", f"{HIDDEN}]"),
    "float32_embeddings": ("send(room=101)", "embeddings", "dtype", "float32", "bfloat16"),
    "embeddings_1d": ("send(room=102)", "embeddings", "2-D"),
    "embeddings_3d": ("send(room=103)", "embeddings", "2-D", f"[1, 20, {HIDDEN}]"),
    "embeddings_not_tensor": ("send(room=104)", "embeddings", "2-D", "list"),
    "embeddings_not_contiguous": ("send(room=105)", "embeddings", "contiguous"),
    "fill_ids_length": ("send(room=106)", "fill_ids", "shape", "[19]", "[20]"),
    "fill_ids_int64": ("send(room=107)", "fill_ids", "dtype", "int64", "int32"),
    "mrope_shape": ("send(room=108)", "mrope_positions", "shape", "[20, 3]", "[3, 20]"),
    "mrope_missing": ("send(room=109)", "mrope_positions", "required", "mrope=True"),
    "seq_0": ("send(room=110)", "seq_len is 0",),
    "seq_over_budget": (f"seq_len={NBLOCKS * BS + 1}", "budget", f"{NBLOCKS} blocks"),
    "unknown_extra": ("send(room=112)", "unknown", "deepstack"),
    "aux_too_long": ("send(room=113)", "aux", str(wire.MAX_AUX)),
}
SEND_ROOM0 = 100


def _room_of_send_case(name: str) -> int:
    return SEND_ROOM0 + list(SEND_CASES).index(name)


# Genuine ALLOC/RESUME of one room rewritten on the Language rank's way out.
# name -> (room, first allocation in tokens, seq, message kind, rewrite, what the
# reasons must name)
def _rw_out_of_range(m: Any) -> Any:
    return dataclasses.replace(m, block_ids=(*m.block_ids[:-1], 10_000))


def _rw_negative(m: Any) -> Any:
    return dataclasses.replace(m, block_ids=(-1, *m.block_ids[1:]))


def _rw_duplicate(m: Any) -> Any:
    return dataclasses.replace(m, block_ids=(m.block_ids[0], *m.block_ids[:-1]))


def _rw_misaligned(m: Any) -> Any:
    return dataclasses.replace(m, allocated_tokens=m.allocated_tokens - 1)


def _rw_zero_tokens(m: Any) -> Any:
    return dataclasses.replace(m, allocated_tokens=0)


def _rw_instance_size(m: Any) -> Any:
    return dataclasses.replace(m, instance_size=5)


def _rw_sent_tokens(m: Any) -> Any:
    return dataclasses.replace(m, sent_tokens=m.sent_tokens + 5)


def _rw_resume_blocks(m: Any) -> Any:
    return dataclasses.replace(m, block_ids=(10_000,), allocated_tokens=BS, direct=False)


REWRITE_CASES: dict[str, tuple[int, int, int, str, Callable[[Any], Any], tuple[str, ...]]] = {
    "alloc_block_out_of_range": (400, 32, 20, "Alloc", _rw_out_of_range,
                                 ("ALLOC", "10000", "out of range")),
    "alloc_block_negative": (402, 32, 20, "Alloc", _rw_negative,
                             ("ALLOC", "-1", "out of range")),
    "alloc_duplicate_blocks": (404, 32, 20, "Alloc", _rw_duplicate,
                               ("ALLOC", "duplicate")),
    "alloc_misaligned_tokens": (406, 32, 20, "Alloc", _rw_misaligned,
                                ("ALLOC", "allocated_tokens=31")),
    "alloc_zero_tokens": (408, 32, 20, "Alloc", _rw_zero_tokens,
                          ("ALLOC", "allocated_tokens=0")),
    "alloc_instance_size": (410, 32, 20, "Alloc", _rw_instance_size,
                            ("ALLOC", "instance_size=5")),
    "resume_sent_tokens": (412, 32, 100, "Resume", _rw_sent_tokens,
                           ("RESUME", "sent_tokens=37", "32 tokens were sent")),
    "resume_block_out_of_range": (414, 32, 100, "Resume", _rw_resume_blocks,
                                  ("RESUME", "10000", "out of range")),
}


def _header(kind: int, room: int, *, lang_rank: int = 1, version: int = wire.VERSION,
            magic: int = wire.MAGIC, num_items: int = 0, allocated: int = 0,
            sent: int = 0, instance: int = 1) -> bytes:
    return struct.pack("<HBBIqiiqqI", magic, version, kind, 0, room, lang_rank, instance,
                       sent, allocated, num_items)


def _crafted(lang_rank: int) -> dict[str, bytes]:
    """Hostile messages; none names a room that is live anywhere."""
    alloc = wire.encode(wire.Alloc(990, lang_rank, 1, (0, 1), 2 * BS))
    g = torch.Generator().manual_seed(7)
    junk = bytes(torch.randint(0, 256, (97,), generator=g, dtype=torch.uint8).tolist())
    return {
        "alloc_out_of_range": wire.encode(wire.Alloc(991, lang_rank, 1, (0, 99_999), 2 * BS)),
        "alloc_duplicate": wire.encode(wire.Alloc(992, lang_rank, 1, (3, 3), 2 * BS)),
        "alloc_misaligned": wire.encode(wire.Alloc(993, lang_rank, 1, (0, 1), 2 * BS - 3)),
        "resume_unsent": wire.encode(wire.Resume(994, lang_rank, 4096, (0,), BS)),
        "random_bytes": b"\x00\x01" + junk,
        "truncated_header": alloc[:wire.HEADER_SIZE - 5],
        "wrong_version": _header(wire.MsgKind.ALLOC, 995, lang_rank=lang_rank, version=9),
    }


# ---------------------------------------------------------------- the main run

def _main_run(rank: int, world: int, init_method: str) -> dict[str, Any]:
    ctx = disagg.init(_cfg(), rank=rank, world_size=world, init_method=init_method)
    try:
        sync = _Sync()
        if ctx.role == "embedding":
            return _embedding_side(ctx, sync)
        return _language_side(ctx, sync)
    finally:
        ctx.shutdown()


def _embedding_side(ctx: Any, sync: _Sync) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sync.put("addr", ctx.control_address)

    # 1. send() validation: ValueError, then the same sender sends valid data
    for name in SEND_CASES:
        room = _room_of_send_case(name)
        s = ctx.embedding.sender(room)
        args, kw = _send_case(name, 20)
        err = _raises(lambda s=s, args=args, kw=kw: s.send(*args, **kw))
        emb, ids, mrope = _data(room, _seq(room))
        s.send(emb, ids, mrope, aux=_aux(room))
        out[f"send/{name}"] = {"error": err, **_finish_send(s)}

    # budget full -> PoolFull; the same send works once the earlier room is done
    big = ctx.embedding.sender(200)
    emb, ids, mrope = _data(200, 100)  # 7 of the 8 budget blocks
    big.send(emb, ids, mrope, aux=_aux(200))
    small = ctx.embedding.sender(201)
    emb2, ids2, mrope2 = _data(201, 32)  # 2 blocks
    err = _raises(lambda: small.send(emb2, ids2, mrope2, aux=_aux(201)))
    status_when_full = small.poll().name
    sync.put("pool_full_checked")
    out["pool_full/big"] = _finish_send(big)
    small.send(emb2, ids2, mrope2, aux=_aux(201))
    out["pool_full/small"] = {"error": err, "status_when_full": status_when_full,
                              **_finish_send(small)}

    # 2. API misuse on this side: invalid and reused room ids
    out["room_id/invalid"] = [_raises(lambda r=r: ctx.embedding.sender(r))
                              for r in (-1, 1 << 63, True, "7")]
    s = ctx.embedding.sender(301)
    err = _raises(lambda: ctx.embedding.sender(301))
    emb, ids, mrope = _data(301, _seq(301))
    s.send(emb, ids, mrope, aux=_aux(301))
    err_twice = _raises(lambda: s.send(emb, ids, mrope, aux=_aux(301)))
    sync.put("301_sent")  # only now may the Language rank ask for it
    out["room_id/reused"] = {"error": err, "error_send_twice": err_twice, **_finish_send(s)}
    out["room_id/after_language_misuse"] = _send_room(ctx, 302)

    # 3a. foreign identities: dropped before decoding, the control thread survives
    base, base_msg = _failures(ctx, "bad_peer"), _failures(ctx, "bad_message")
    sync.put("foreign_base")
    n = sync.get("foreign_sent")
    _wait(lambda: _failures(ctx, "bad_peer") >= base + n, f"{n} foreign messages dropped")
    out["foreign/dropped"] = {"expected": n, "bad_peer": _failures(ctx, "bad_peer") - base,
                              "bad_message": _failures(ctx, "bad_message") - base_msg}
    sync.put("foreign_seen")
    out["foreign/after"] = _send_room(ctx, 310)

    # an identity that is only an alias of the real one ("L01" for rank 1)
    peer0, msg0 = _failures(ctx, "bad_peer"), _failures(ctx, "bad_message")
    sync.put("alias_base")
    sync.get("alias_sent")
    _wait(lambda: _failures(ctx, "bad_peer") + _failures(ctx, "bad_message") > peer0 + msg0,
          "the aliased identity's message")
    out["foreign/alias_identity"] = {"bad_peer": _failures(ctx, "bad_peer") - peer0,
                                     "bad_message": _failures(ctx, "bad_message") - msg0}
    sync.put("alias_seen")
    out["foreign/alias_after"] = _send_room(ctx, 312)

    # 3b. malformed messages on the genuine Language rank's own socket
    base = _failures(ctx, "bad_message")
    sync.put("garbage_base")
    n = sync.get("genuine_garbage_sent")
    _wait(lambda: _failures(ctx, "bad_message") >= base + n, f"{n} malformed messages")
    out["garbage/rejected"] = {"expected": n, "bad_message": _failures(ctx, "bad_message") - base}
    sync.put("genuine_garbage_seen")
    out["garbage/after"] = _send_room(ctx, 320)

    # ... and naming a live room: that room fails, on both ranks
    for room in (330, 332):
        s = ctx.embedding.sender(room)
        emb, ids, mrope = _data(room, _seq(room))
        s.send(emb, ids, mrope, aux=_aux(room))
        sync.put(f"ready/{room}")
        try:
            res = _finish_send(s, timeout=3.0)
        except TimeoutError:
            res = {"status": s.poll().name, "failure": s.failure}
            s.abort("test cleanup: room was never failed")
            _finish_send(s)
        out[f"garbage/live_room_{room}"] = res
        sync.put(f"done/{room}")
        out[f"garbage/live_room_{room}_after"] = _send_room(ctx, room + 1)

    # 3c. the genuine Language rank's ALLOC / RESUME rewritten for one room
    for name, (room, _num, seq, _kind, _rw, _) in REWRITE_CASES.items():
        s = ctx.embedding.sender(room)
        emb, ids, mrope = _data(room, seq)
        s.send(emb, ids, mrope, aux=_aux(room))
        sync.put(f"ready/{room}")
        out[f"rewrite/{name}"] = _finish_send(s)
        out[f"rewrite/{name}/after"] = _send_room(ctx, room + 1)

    sync.put("embedding_done")
    sync.get("language_done")
    _wait(lambda: _pool_whole(ctx), "the embedding budget to be whole", timeout=5)
    out["stats"] = ctx.stats()
    return out


def _language_side(ctx: Any, sync: _Sync) -> dict[str, Any]:
    import zmq

    out: dict[str, Any] = {}
    eng = ctx.language.engine
    addr = sync.get("addr")

    # 1. send() validation happens on the Embedding rank; here every room arrives
    for name in SEND_CASES:
        out[f"send/{name}"] = _recv_room(ctx, _room_of_send_case(name))
    sync.get("pool_full_checked")
    out["pool_full/big"] = _recv_room(ctx, 200, seq=100)
    out["pool_full/small"] = _recv_room(ctx, 201, seq=32)

    # 2. API misuse on this side
    out["src_rank/not_embedding"] = [_raises(lambda e=e: ctx.language.receiver(300, src_rank=e))
                                     for e in (1, 7, -1)]
    out["room_id/invalid"] = [_raises(lambda r=r: ctx.language.receiver(r, src_rank=0))
                              for r in (-1, 1 << 63, True)]
    r = ctx.language.receiver(301, src_rank=0)
    err = _raises(lambda: ctx.language.receiver(301, src_rank=0))
    init_errors = [_raises(lambda n=n: r.init(num_tokens=n)) for n in (0, -16, True)]
    resume_error = _raises(lambda: r.resume(num_tokens=0))
    status_after = r.poll().name
    sync.get("301_sent")
    _wait(lambda: r.init(), "room 301 init")
    out["room_id/reused"] = {"error": err, **_finish_recv(ctx, r, _seq(301))}
    out["init/bad_num_tokens"] = {"errors": init_errors, "resume_error": resume_error,
                                  "status_after": status_after}
    out["room_id/after_language_misuse"] = _recv_room(ctx, 302)

    # 3a. raw DEALERs with identities that are not this rank's: everything dropped
    zctx = zmq.Context()
    socks: list[Any] = []

    def dealer(identity: bytes | None) -> Any:
        sock = zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(addr)
        socks.append(sock)
        return sock

    try:
        sync.get("foreign_base")
        n = 0
        l9, x = dealer(b"L9"), dealer(b"X")  # one connection per identity (no duplicates)
        for sock, lang_rank in ((l9, 9), (x, 1)):
            for payload in _crafted(lang_rank).values():
                sock.send(payload)
                n += 1
        x.send_multipart([b"two", b"frames"])
        n += 1
        l9.send(b"")
        n += 1
        dealer(None).send(_crafted(1)["alloc_out_of_range"])  # ZeroMQ-generated identity
        n += 1
        # a second connection with the real identity claims another rank: the ROUTER
        # must not let it take over (nor, if it did, accept the claim)
        dealer(b"L1").send(wire.encode(wire.Alloc(996, 7, 1, (0,), BS)))
        # larger than MAXMSGSIZE: ZeroMQ drops the connection; nothing reaches the engine
        dealer(b"L8").send(b"\0" * (5 << 20))
        sync.put("foreign_sent", n)
        sync.get("foreign_seen")
        out["foreign/after"] = _recv_room(ctx, 310)

        sync.get("alias_base")
        dealer(b"L01").send(wire.encode(wire.Alloc(997, 7, 1, (0,), BS)))
        sync.put("alias_sent")
        sync.get("alias_seen")
        out["foreign/alias_after"] = _recv_room(ctx, 312)
    finally:
        for sock in socks:
            sock.close(linger=0)
        zctx.term()

    # 3b. malformed / impossible messages through the genuine socket (identity b"L1").
    # None is an ALLOC/RESUME the Embedding rank could accept, so none is answered on
    # the pair stream; each names a room that is not live here.
    ctrl = eng.control
    garbage = {k: v for k, v in _crafted(1).items()
               if k in ("random_bytes", "truncated_header", "wrong_version")}
    garbage.update({
        "bad_magic": _header(wire.MsgKind.ALLOC, 980, magic=0xBEEF),
        "unknown_kind": _header(77, 981),
        "negative_room": _header(wire.MsgKind.ABORT, -5),
        "unknown_flags": wire.encode(wire.Alloc(982, 1, 1, (0,), BS))[:4]
        + b"\x80\0\0\0" + wire.encode(wire.Alloc(982, 1, 1, (0,), BS))[8:],
        "short_body": _header(wire.MsgKind.ALLOC, 983, num_items=3, allocated=3 * BS)
        + b"\0" * 8,
        "reason_too_long": _header(wire.MsgKind.ABORT, 984, num_items=5000) + b"x" * 5000,
        "reason_not_utf8": _header(wire.MsgKind.ABORT, 985, num_items=2) + b"\xff\xfe",
        "reject_from_language": wire.encode(wire.Reject(986, 0, "not yours to send")),
        "claims_rank_7": wire.encode(wire.Alloc(987, 7, 1, (0,), BS)),
    })
    sync.get("garbage_base")
    for payload in garbage.values():
        ctrl.post(0, payload)
    ctrl.post(0, wire.encode(wire.Abort(988, 1, "abort of an unknown room is harmless")))
    sync.put("genuine_garbage_sent", len(garbage))
    sync.get("genuine_garbage_seen")
    out["garbage/after"] = _recv_room(ctx, 320)

    # ... naming a live room (ALLOC not yet sent): the room fails with the reason
    live = {330: _header(wire.MsgKind.ALLOC, 330, version=9),
            332: wire.encode(wire.Resume(332, 7, 0, (), BS, direct=True))}
    for room, payload in live.items():
        sync.get(f"ready/{room}")
        r = ctx.language.receiver(room, src_rank=0)
        ctrl.post(0, payload)
        try:
            res = _finish_recv(ctx, r, _seq(room), timeout=3.0)
        except TimeoutError:
            res = {"status": r.poll().name, "failure": r.failure, "pool_whole": False}
            r.abort("test cleanup: room was never failed")
        out[f"garbage/live_room_{room}"] = res
        sync.get(f"done/{room}")
        out[f"garbage/live_room_{room}_after"] = _recv_room(ctx, room + 1)

    # 3c. rewrite one room's genuine ALLOC or RESUME on its way out
    orig_post = ctrl.post
    rewrites: dict[tuple[str, int], Callable[[Any], Any]] = {
        (kind, room): rw for room, _n, _s, kind, rw, _ in REWRITE_CASES.values()}
    rewritten: list[Any] = []

    def post(dest: Any, payload: Any) -> None:
        # the engine posts decoded messages (the channel encodes them)
        m = payload
        if isinstance(payload, bytes):
            try:
                m = wire.decode(payload)
            except disagg.ProtocolError:
                return orig_post(dest, payload)
        rw = rewrites.pop((type(m).__name__, getattr(m, "room", None)), None)
        if rw is not None:
            m = rw(m)
            rewritten.append(m)
        return orig_post(dest, m)

    ctrl.post = post
    try:
        for name, (room, num, seq, _kind, _rw, _) in REWRITE_CASES.items():
            sync.get(f"ready/{room}")
            res = _recv_room(ctx, room, num_tokens=num, seq=seq)
            res["rewritten"] = repr(rewritten[-1]) if rewritten else None
            out[f"rewrite/{name}"] = res
            out[f"rewrite/{name}/after"] = _recv_room(ctx, room + 1)
    finally:
        del ctrl.post

    sync.get("embedding_done")
    sync.put("language_done")
    out["stats"] = ctx.stats()
    return out


@pytest.fixture(scope="module")
def main_run() -> tuple[dict[str, Any], dict[str, Any]]:
    """One 2-rank run (rank 0 Embedding, rank 1 Language): (rank 0's, rank 1's) outcomes."""
    e, lang = spawn(2, _main_run, timeout=100)
    return e, lang


# ---------------------------------------------------------------- assertions

def _assert_error(err: Any, typ: str, *needles: str) -> None:
    assert err is not None, f"expected {typ}, nothing was raised"
    got_type, msg = err
    assert got_type == typ, f"expected {typ}, got {got_type}: {msg}"
    for needle in needles:
        assert needle in msg, f"{typ} message does not name {needle!r}: {msg}"


def _assert_ok(e: dict[str, Any], lang: dict[str, Any]) -> None:
    """An ordinary room: SUCCESS on both ranks, bit-exact, blocks back."""
    assert e["status"] == "SUCCESS", e
    assert lang["status"] == "SUCCESS", lang
    assert lang["exact"], "room did not arrive bit-exact"
    assert lang["pool_whole"], "language pool not whole after the room"


@pytest.mark.parametrize("name", list(SEND_CASES))
def test_send_rejects_bad_tensors_then_accepts_good_ones(main_run: Any, name: str) -> None:
    e, lang = (side[f"send/{name}"] for side in main_run)
    _assert_error(e["error"], "builtins.ValueError", *SEND_CASES[name])
    if name == "seq_over_budget":
        # A room longer than the whole budget can never be sent: it fails on both
        # sides at once, with the reason (the later valid send() finds it FAILED).
        for side in (e, lang):
            assert side["status"] == "FAILED" and "whole budget" in side["failure"], side
        assert lang["pool_whole"], lang
        return
    _assert_ok(e, lang)  # the same sender, right after, with valid data


def test_send_pool_full_then_succeeds_after_earlier_room(main_run: Any) -> None:
    e, lang = main_run
    _assert_ok(e["pool_full/big"], lang["pool_full/big"])
    small = e["pool_full/small"]
    _assert_error(small["error"], "disagg.errors.PoolFull", "budget full", "room 201",
                  "needs 2 blocks", f"1 of {NBLOCKS} free")
    assert small["status_when_full"] == "WAITING_FOR_INPUT"  # PoolFull left no trace
    _assert_ok(small, lang["pool_full/small"])


def test_receiver_src_rank_must_be_an_embedding_rank(main_run: Any) -> None:
    _, lang = main_run
    for err, bad in zip(lang["src_rank/not_embedding"], (1, 7, -1), strict=True):
        _assert_error(err, "builtins.ValueError", f"src_rank={bad}", "not an embedding rank",
                      "[0]")


def test_room_ids_must_be_valid_ints(main_run: Any) -> None:
    e, lang = main_run
    for err in [*e["room_id/invalid"], *lang["room_id/invalid"]]:
        _assert_error(err, "builtins.ValueError", "room=", "[0, 2**63)")


def test_room_id_reused_while_live(main_run: Any) -> None:
    e, lang = main_run
    er, lr = e["room_id/reused"], lang["room_id/reused"]
    _assert_error(er["error"], "builtins.ValueError", "room 301", "still live",
                  "embedding rank 0")
    _assert_error(lr["error"], "builtins.ValueError", "room 301", "still live",
                  "language rank 1")
    _assert_error(er["error_send_twice"], "builtins.ValueError", "room 301",
                  "send() was already called")
    _assert_ok(er, lr)  # the first sender / receiver of the room is unharmed
    _assert_ok(e["room_id/after_language_misuse"], lang["room_id/after_language_misuse"])


def test_init_and_resume_reject_bad_num_tokens(main_run: Any) -> None:
    _, lang = main_run
    res = lang["init/bad_num_tokens"]
    for err, bad in zip(res["errors"], ("0", "-16", "True"), strict=True):
        _assert_error(err, "builtins.ValueError", f"init(num_tokens={bad})", ">= 1")
    _assert_error(res["resume_error"], "builtins.ValueError", "resume(num_tokens=0)", ">= 1")
    assert res["status_after"] == "BOOTSTRAPPING"  # nothing allocated, nothing sent


def test_foreign_identities_are_dropped(main_run: Any) -> None:
    e, lang = main_run
    d = e["foreign/dropped"]
    # every message from an identity that is no Language rank's is dropped before
    # decoding; the duplicate "L1" connection must not reach the engine at all
    assert d["bad_peer"] == d["expected"], d
    assert d["bad_message"] == 0, d
    _assert_ok(e["foreign/after"], lang["foreign/after"])


def test_alias_of_a_real_identity_is_dropped(main_run: Any) -> None:
    """b"L01" is not the identity Language rank 1 uses (b"L1"): it must be dropped
    like any unknown peer, not taken for rank 1 (whose stream would then get the
    ABORT frames that answer its ALLOCs)."""
    e, lang = main_run
    d = e["foreign/alias_identity"]
    assert d == {"bad_peer": 1, "bad_message": 0}, (
        f"message from identity b'L01' was taken for language rank 1: {d}")
    _assert_ok(e["foreign/alias_after"], lang["foreign/alias_after"])


def test_malformed_messages_on_the_genuine_socket_fail_nothing_else(main_run: Any) -> None:
    e, lang = main_run
    g = e["garbage/rejected"]
    assert g["bad_message"] == g["expected"], g
    _assert_ok(e["garbage/after"], lang["garbage/after"])


@pytest.mark.parametrize("room,needles", [
    (330, ("malformed", "version 9")),
    (332, ("claims language rank 7",)),
], ids=["wrong_version", "claims_other_rank"])
def test_malformed_message_naming_a_live_room_fails_it_on_both_ranks(
        main_run: Any, room: int, needles: tuple[str, ...]) -> None:
    e, lang = (side[f"garbage/live_room_{room}"] for side in main_run)
    assert lang["status"] == "FAILED", lang
    for needle in needles:
        assert needle in lang["failure"], lang
    assert lang["pool_whole"], lang
    _assert_ok(*(side[f"garbage/live_room_{room}_after"] for side in main_run))
    # The Embedding rank answered with a REJECT naming the room, which fails it on
    # the Language rank; "a bad message ... fails only its room" means the room, not
    # half of it: the Embedding side must not keep the room (the caller's tensors and
    # its budget) waiting bootstrap_timeout for an ALLOC that will never come.
    assert e["status"] == "FAILED", (
        f"room {room}: language rank FAILED it on the embedding rank's REJECT, but the "
        f"embedding rank kept it alive: {e}")
    for needle in needles:
        assert needle in (e["failure"] or ""), e


@pytest.mark.parametrize("name", list(REWRITE_CASES))
def test_bad_alloc_or_resume_from_the_language_rank_fails_only_its_room(
        main_run: Any, name: str) -> None:
    e, lang = (side[f"rewrite/{name}"] for side in main_run)
    needles = REWRITE_CASES[name][5]
    assert lang["rewritten"] is not None, "the message was never rewritten"
    assert e["status"] == "FAILED", e
    assert lang["status"] == "FAILED", lang
    assert lang["pool_whole"], f"the room's blocks did not come back: {lang}"
    _assert_ok(*(side[f"rewrite/{name}/after"] for side in main_run))
    for needle in needles:
        assert needle in e["failure"], f"embedding reason does not name {needle!r}: {e}"
    # The Language rank learns why from the REJECT (ZeroMQ); the ABORT frame that
    # answers its allocation comes on the pair stream. Whichever lands first, the
    # room's failure must say what was wrong, not just "aborted".
    for needle in needles:
        assert needle in lang["failure"], (
            f"language reason does not name {needle!r}: {lang['failure']!r}")


def test_pools_whole_at_the_end(main_run: Any) -> None:
    for side in main_run:
        s = side["stats"]
        assert s["pool_free_blocks"] == s["pool_total_blocks"] == NBLOCKS, s
        assert s["rooms_live"] == 0, s


# ---------------------------------------------------------------- disagg.init errors

INIT_CASES = ("world_size_split", "block_size", "hidden_size", "dtype", "extra_buffer", "ok")


def _init_run(rank: int, world: int, init_method: str, tmpdir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in INIT_CASES:
        mine: dict[str, Any] = {}
        if name == "world_size_split":
            mine = {"language_tp_size": 2}
        elif rank == 1 and name == "block_size":
            mine = {"block_size": 2 * BS}
        elif rank == 1 and name == "hidden_size":
            mine = {"hidden_size": 2 * HIDDEN}
        elif rank == 1 and name == "dtype":
            mine = {"dtype": "float16"}
        elif rank == 1 and name == "extra_buffer":
            mine = {"extra_buffers": {"deepstack": ((2,), "bfloat16")}}
        method = f"file://{tmpdir}/{name}"
        try:
            ctx = disagg.init(_cfg(**mine), rank=rank, world_size=world, init_method=method)
        except Exception as e:
            out[name] = {"error": (f"{type(e).__module__}.{type(e).__qualname__}", str(e)),
                         "world_left": dist.is_initialized()}
            continue
        try:  # a good init after all those failures works, and moves a room
            out[name] = (_send_room(ctx, 7) if ctx.role == "embedding"
                         else _recv_room(ctx, 7))
        finally:
            ctx.shutdown()
        out[name]["world_left"] = dist.is_initialized()
    return out


def test_init_errors(tmp_path: Path) -> None:
    e, lang = spawn(2, _init_run, str(tmp_path), timeout=60)
    for side in (e, lang):
        err = side["world_size_split"]["error"]
        _assert_error(err, "builtins.ValueError", "world_size=2", "num_embedding_ranks=1",
                      "language_tp_size=2", "e.g. 3")
        assert not side["world_size_split"]["world_left"], "failed init left the world joined"
    for side, me, peer in ((e, 0, 1), (lang, 1, 0)):
        for name, mine_val, theirs_val in (
                ("block_size", f"{BS}", f"{2 * BS}"),
                ("hidden_size", f"embeddings[{HIDDEN}]", f"embeddings[{2 * HIDDEN}]"),
                ("dtype", f"embeddings[{HIDDEN}]:bfloat16", f"embeddings[{HIDDEN}]:float16"),
                ("extra_buffer", "mrope_positions[3]:int32]", "deepstack[2]:bfloat16")):
            ranks = {0: mine_val, 1: theirs_val}
            _assert_error(side[name]["error"], "disagg.errors.GeometryMismatch",
                          f"rank {me} has", f"rank {peer} has", ranks[me], ranks[peer])
            assert not side[name]["world_left"]
    _assert_ok(e["ok"], lang["ok"])
    assert not e["ok"]["world_left"] and not lang["ok"]["world_left"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_init_nccl_without_gpu(tmp_path: Path) -> None:
    err = _raises(lambda: disagg.init(_cfg(backend="nccl"), rank=0, world_size=1,
                                      init_method=f"file://{tmp_path}/nccl"))
    _assert_error(err, "builtins.ValueError", "backend='nccl'", "no CUDA GPU", "gloo")
    assert not dist.is_initialized()


@pytest.mark.parametrize("field,value", [
    ("block_size", 0), ("num_blocks", -1), ("hidden_size", True), ("dtype", "float8"),
    ("default_alloc_tokens", 0), ("recv_into", "gpu"), ("backend", "mpi"),
    ("bootstrap_timeout", 0), ("peer_timeout", float("nan")), ("host", "0.0.0.0"),
    ("extra_buffers", {"embeddings": ((1,), "int32")}),
    ("extra_buffers", {"deepstack": ((0,), "bfloat16")}),
])
def test_config_rejects_bad_values(field: str, value: Any) -> None:
    err = _raises(lambda: _cfg(**{field: value}))
    _assert_error(err, "builtins.ValueError", f"DisaggConfig.{field}=")
