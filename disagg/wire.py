"""Wire format of the ZeroMQ control messages, no I/O.

Control message (little-endian): a fixed 44-byte header

    magic u16 | version u8 | kind u8 | flags u32 | room i64 | lang_rank i32 |
    instance_size i32 | sent_tokens i64 | allocated_tokens i64 | num_items u32

then `num_items` int32 block ids (ALLOC, RESUME) or `num_items` UTF-8 bytes of
reason (ABORT, REJECT, PAIR_DOWN). Decoding checks structure only and raises
`ProtocolError`; whether block ids fit the receiver's pool is checked by the
Embedding engine, which knows each peer's geometry.

The data plane's meta frame is `meta.py`'s.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

from .errors import ProtocolError, clip_reason

MAGIC = 0xD15A
# 2: a pre-posted RESUME carries the tokens its posted recvs expect
# 3: an ALLOC may carry its source's item table (FLAG_ITEMS)
# 4: PAIR_DOWN with FLAG_IDLE, i.e. PairClose (pairs made on demand, closed when idle)
VERSION = 4
MAX_ROOM = (1 << 63) - 1
MAX_BLOCKS_PER_MESSAGE = 1 << 20
MAX_REASON_BYTES = 1024
MAX_AUX = 1024  # aux values a room may carry (they travel with its first chunk)
MAX_INLINE_AUX = 8  # of which the meta frame itself holds this many
MAX_ITEMS_PER_MESSAGE = 4096  # a source's items in one ALLOC (64 KiB of table)
MAX_ITEM_TOKENS = (1 << 31) - 1  # an item table's offsets and counts are int32

_HEADER = struct.Struct("<HBBIqiiqqI")
HEADER_SIZE = _HEADER.size


class MsgKind(enum.IntEnum):
    ALLOC = 1
    RESUME = 2
    ABORT = 3
    REJECT = 4
    HEARTBEAT = 5
    PAIR_DOWN = 6


FLAG_DIRECT = 1  # the plan is one contiguous run into the room's output; blocks are credit
FLAG_BYE = 2  # HEARTBEAT: the sender is shutting down cleanly
FLAG_SCATTER = 4  # ALLOC: fanout="scatter", send this rank only its token slice (plan.scatter_slice)
# ALLOC (with a declared seq_len) and RESUME: the receiver has already posted this
# frame's recvs (meta, then the payload of exactly `plan.expected_tokens`), so the
# answer must be that DATA, or an ABORT or DEFER frame padded to the same sizes
FLAG_PREPOSTED = 8
# ALLOC: the room is declared as items (DESIGN 0.3); after the block ids, a
# u32 count and that many (index, first token, tokens, needed) int32 entries:
# the items this Embedding rank sends, and which of them are not cache hits
FLAG_ITEMS = 16
# ABORT: the Language serving loop cancelled the room (`RoomQueue.cancel`)
FLAG_CANCELLED = 32
# PAIR_DOWN: not a loss but an idle close of one generation (`PairClose`); with
# FLAG_ASK (E -> L) a request: close it if it is idle on your side too
FLAG_IDLE = 64
FLAG_ASK = 128
_ITEM = struct.Struct("<iiii")
ITEM_ENTRY_BYTES = _ITEM.size


@dataclass(frozen=True)
class AllocItem:
    """One item of a room in its source's ALLOC: its index in the room's item
    list, its first token and token count in the room, and whether it must be
    sent (False: the Language instance holds it already, a cache hit)."""

    index: int
    offset: int
    num_tokens: int
    needed: bool


@dataclass(frozen=True)
class Alloc:
    """L -> E: first allocation of a room by one Language rank. `seq_len`: the
    room's length as the Language caller declared it (0: not declared); it
    travels in the header's sent_tokens word, which an ALLOC has no other use for."""

    room: int
    lang_rank: int
    instance_size: int
    block_ids: tuple[int, ...]
    allocated_tokens: int
    direct: bool = False
    seq_len: int = 0
    scatter: bool = False  # this rank wants only its slice of the room (fanout="scatter")
    preposted: bool = False  # the answer's recvs are posted (FLAG_PREPOSTED); needs seq_len
    items: tuple[AllocItem, ...] | None = None  # FLAG_ITEMS: this source's items; None: none


@dataclass(frozen=True)
class Resume:
    """L -> E: next allocation after `sent_tokens` landed. `direct` with no
    blocks means straight into the output, `allocated_tokens` of credit."""

    room: int
    lang_rank: int
    sent_tokens: int
    block_ids: tuple[int, ...]
    allocated_tokens: int
    direct: bool = False
    preposted: bool = False  # the answer's recvs are posted (FLAG_PREPOSTED)
    # pre-posted: the chunk's tokens the posted recvs expect (`plan.prepost_tokens`),
    # in the header's instance_size word, which a RESUME has no other use for. Every
    # answer, a refusal in any state or after the id was reused included, is sized
    # from it: the receiver's word for what it posted, never a record of ours.
    posted_tokens: int = 0


@dataclass(frozen=True)
class Abort:
    """L -> E: this Language rank gives up the room; `cancelled`: its serving
    loop cancelled it (FLAG_CANCELLED), the client is gone."""

    room: int
    lang_rank: int
    reason: str
    cancelled: bool = False


@dataclass(frozen=True)
class Reject:
    """E -> L: the room failed on the Embedding side, or a request was refused.

    `sent_tokens` names the refused allocation (0 for an ALLOC, the RESUME's
    sent_tokens); -1 when no allocation of this Language rank was refused, in
    which case any outstanding one will still be answered on the data stream.
    """

    room: int
    sent_tokens: int
    reason: str


@dataclass(frozen=True)
class Heartbeat:
    """L -> E every heartbeat interval, E -> L in answer: liveness of the pair's
    peer, so a rank learns within peer_timeout that the other side died even when
    no recv of its own is posted to notice. `bye`: a clean shutdown; then
    `frames` (E -> L) counts every frame the Embedding rank put on the pair's
    stream, so the Language rank reads what is still on its way before it
    gives the pair up (-1: not counted)."""

    rank: int
    bye: bool = False
    frames: int = -1


@dataclass(frozen=True)
class PairDown:
    """Either way: the sender tore the pair's stream down (it broke, or the peer
    fell silent for peer_timeout) and will not use it again; the receiver does
    the same, so both sides agree the pair is gone, and why."""

    rank: int
    reason: str


@dataclass(frozen=True)
class PairClose(PairDown):
    """L -> E: the Language rank closed its end of the pair's process group of
    generation `gen` (idle: no live room, nothing owed), and the Embedding rank
    closes its end; the next group of the pair is generation `gen + 1`. Sent
    before any later ALLOC on the same socket, so it arrives first. `ask`
    (E -> L): the Embedding rank would like it closed (it is at `max_pairs`, or
    the pair idled for `pair_idle_s`); the Language rank closes it if it is
    idle on its side too, else ignores it. A PAIR_DOWN with FLAG_IDLE on the
    wire: the pair is down until a room needs it again, not lost."""

    gen: int = 0
    ask: bool = False


ControlMessage = Alloc | Resume | Abort | Reject | Heartbeat | PairDown | PairClose


def _reason_bytes(reason: str) -> bytes:
    """A reason in at most MAX_REASON_BYTES: whole, or cut at a word's end with
    " ..." after it (never mid-word, never mid-character)."""
    return clip_reason(reason, MAX_REASON_BYTES).encode("utf-8", errors="replace")



def encode(msg: ControlMessage) -> bytes:
    if isinstance(msg, (Alloc, Resume)):
        if len(msg.block_ids) > MAX_BLOCKS_PER_MESSAGE:
            raise ValueError(f"{len(msg.block_ids)} blocks in one message")
        is_alloc = isinstance(msg, Alloc)
        head = _HEADER.pack(
            MAGIC, VERSION, MsgKind.ALLOC if is_alloc else MsgKind.RESUME,
            (FLAG_DIRECT if msg.direct else 0) | (FLAG_PREPOSTED if msg.preposted else 0)
            | (FLAG_SCATTER if isinstance(msg, Alloc) and msg.scatter else 0)
            | (FLAG_ITEMS if isinstance(msg, Alloc) and msg.items is not None else 0),
            msg.room, msg.lang_rank,
            msg.instance_size if isinstance(msg, Alloc) else msg.posted_tokens,
            msg.seq_len if isinstance(msg, Alloc) else msg.sent_tokens,
            msg.allocated_tokens, len(msg.block_ids))
        out = head + np.asarray(msg.block_ids, dtype="<i4").tobytes()
        if isinstance(msg, Alloc) and msg.items is not None:
            out += _encode_items(msg.items, msg.seq_len)
        return out
    if isinstance(msg, Abort):
        raw = _reason_bytes(msg.reason)
        return _HEADER.pack(MAGIC, VERSION, MsgKind.ABORT,
                            FLAG_CANCELLED if msg.cancelled else 0, msg.room, msg.lang_rank,
                            0, 0, 0, len(raw)) + raw
    if isinstance(msg, Heartbeat):
        return _HEADER.pack(MAGIC, VERSION, MsgKind.HEARTBEAT, FLAG_BYE if msg.bye else 0, 0,
                            msg.rank, 0, msg.frames, 0, 0)
    if isinstance(msg, PairDown):
        raw = _reason_bytes(msg.reason)
        flags, gen = 0, 0
        if isinstance(msg, PairClose):
            flags, gen = FLAG_IDLE | (FLAG_ASK if msg.ask else 0), msg.gen
        return _HEADER.pack(MAGIC, VERSION, MsgKind.PAIR_DOWN, flags, 0, msg.rank,
                            0, gen, 0, len(raw)) + raw
    if isinstance(msg, Reject):
        raw = _reason_bytes(msg.reason)
        return _HEADER.pack(MAGIC, VERSION, MsgKind.REJECT, 0, msg.room, -1,
                            0, msg.sent_tokens, 0, len(raw)) + raw
    raise TypeError(f"not a control message: {type(msg).__name__}")


def _check_items(items: tuple[AllocItem, ...], seq_len: int) -> str | None:
    """What is wrong with an item table, or None: 1..MAX_ITEMS_PER_MESSAGE
    entries in room order (indices and spans increasing, spans disjoint), each
    of at least one token, whose needed ones hold the ALLOC's seq_len: an item
    room's ALLOC declares what its source sends (0: nothing, all hits)."""
    if not 0 < len(items) <= MAX_ITEMS_PER_MESSAGE:
        return f"{len(items)} items (1..{MAX_ITEMS_PER_MESSAGE})"
    index, end = -1, 0
    for it in items:
        if it.index <= index or it.offset < end or it.num_tokens < 1:
            return (f"item {it.index} at token {it.offset} ({it.num_tokens} tokens) out of "
                    f"order or empty after item {index} ending at {end}")
        index, end = it.index, it.offset + it.num_tokens
        if end > MAX_ITEM_TOKENS:
            return f"item {it.index} ends at token {end}, past {MAX_ITEM_TOKENS}"
    needed = sum(it.num_tokens for it in items if it.needed)
    if needed != seq_len:
        return (f"the needed items hold {needed} tokens, but the ALLOC declares "
                f"seq_len={seq_len} (what this source sends)")
    return None


def _encode_items(items: tuple[AllocItem, ...], seq_len: int) -> bytes:
    why = _check_items(items, seq_len)
    if why is not None:
        raise ValueError(f"item table: {why}")
    return struct.pack("<I", len(items)) + b"".join(
        _ITEM.pack(it.index, it.offset, it.num_tokens, int(it.needed)) for it in items)


def _decode_items(raw: bytes, room: int, seq_len: int) -> tuple[AllocItem, ...]:
    """An ALLOC's item table, from the bytes after its block ids (it must end
    the message); `ProtocolError` saying what is wrong."""
    if len(raw) < 4:
        raise ProtocolError("ALLOC flags an item table but carries none", room=room)
    (count,) = struct.unpack_from("<I", raw)
    if count > MAX_ITEMS_PER_MESSAGE or len(raw) != 4 + _ITEM.size * count:
        raise ProtocolError(f"ALLOC item table announces {count} items (limit "
                            f"{MAX_ITEMS_PER_MESSAGE}) in {len(raw) - 4} bytes", room=room)
    entries = [_ITEM.unpack_from(raw, 4 + _ITEM.size * i) for i in range(count)]
    if any(needed not in (0, 1) for *_, needed in entries):
        raise ProtocolError("ALLOC item table: a needed flag other than 0 or 1", room=room)
    items = tuple(AllocItem(i, o, n, bool(needed)) for i, o, n, needed in entries)
    why = _check_items(items, seq_len)
    if why is not None:
        raise ProtocolError(f"ALLOC item table: {why}", room=room)
    return items


def peek_room(data: bytes) -> int | None:
    """The room a (possibly malformed) message names, if its header is readable."""
    if len(data) < HEADER_SIZE:
        return None
    room = _HEADER.unpack_from(data)[4]
    return room if 0 <= room <= MAX_ROOM else None


def decode(data: bytes) -> ControlMessage:
    """Parse one control message; raise `ProtocolError` saying what is wrong."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"truncated control message: {len(data)} bytes < header "
                            f"{HEADER_SIZE}")
    (magic, version, kind, flags, room, lang_rank, instance_size, sent_tokens,
     allocated_tokens, num_items) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic 0x{magic:04x}")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks "
                            f"{VERSION})")
    try:
        kind = MsgKind(kind)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}") from None
    if room < 0:
        raise ProtocolError(f"negative room id {room}")
    body = data[HEADER_SIZE:]
    if kind is MsgKind.HEARTBEAT:
        if flags & ~FLAG_BYE or num_items or body:
            raise ProtocolError(f"malformed HEARTBEAT (flags 0x{flags:x}, {len(body)} body "
                                f"bytes)")
        return Heartbeat(lang_rank, bool(flags & FLAG_BYE), max(-1, sent_tokens))
    allowed = {MsgKind.ALLOC: FLAG_DIRECT | FLAG_SCATTER | FLAG_PREPOSTED | FLAG_ITEMS,
               MsgKind.RESUME: FLAG_DIRECT | FLAG_PREPOSTED,
               MsgKind.ABORT: FLAG_DIRECT | FLAG_CANCELLED,
               MsgKind.PAIR_DOWN: FLAG_DIRECT | FLAG_IDLE | FLAG_ASK}.get(kind, FLAG_DIRECT)
    if flags & ~allowed:
        raise ProtocolError(f"unknown flags 0x{flags:x}")
    if kind in (MsgKind.ALLOC, MsgKind.RESUME):
        if num_items > MAX_BLOCKS_PER_MESSAGE:
            raise ProtocolError(f"{num_items} blocks exceeds the limit "
                                f"{MAX_BLOCKS_PER_MESSAGE}", room=room)
        items = None
        if flags & FLAG_ITEMS:  # ALLOC only (the flags check above)
            items = _decode_items(body[4 * num_items:], room, sent_tokens)
            body = body[:4 * num_items]
        if len(body) != 4 * num_items:
            raise ProtocolError(f"{kind.name} announces {num_items} blocks but carries "
                                f"{len(body)} bytes", room=room)
        blocks = tuple(np.frombuffer(body, dtype="<i4").tolist())
        direct = bool(flags & FLAG_DIRECT)
        if kind is MsgKind.ALLOC:
            if sent_tokens < 0:
                raise ProtocolError(f"ALLOC declares seq_len={sent_tokens}", room=room)
            if flags & FLAG_PREPOSTED and not sent_tokens:
                raise ProtocolError("ALLOC with posted recvs declares no seq_len", room=room)
            return Alloc(room, lang_rank, instance_size, blocks, allocated_tokens, direct,
                         sent_tokens, bool(flags & FLAG_SCATTER), bool(flags & FLAG_PREPOSTED),
                         items)
        preposted = bool(flags & FLAG_PREPOSTED)
        # Any count its recvs may hold is decoded: the Embedding rank answers it,
        # padded to that count, even when the rest of the message is refused.
        if instance_size < 0 or (instance_size and not preposted):
            raise ProtocolError(f"RESUME (pre-posted: {preposted}) says its recvs expect "
                                f"{instance_size} tokens", room=room)
        return Resume(room, lang_rank, sent_tokens, blocks, allocated_tokens, direct,
                      preposted, instance_size)
    if num_items > MAX_REASON_BYTES or len(body) != num_items:
        raise ProtocolError(f"{kind.name} reason length {num_items} does not match "
                            f"{len(body)} bytes (limit {MAX_REASON_BYTES})", room=room)
    try:
        reason = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{kind.name} reason is not UTF-8", room=room) from None
    if kind is MsgKind.ABORT:
        return Abort(room, lang_rank, reason, bool(flags & FLAG_CANCELLED))
    if kind is MsgKind.PAIR_DOWN:
        if flags & FLAG_IDLE:
            if sent_tokens < 0:
                raise ProtocolError(f"PAIR_DOWN (idle) of generation {sent_tokens}")
            return PairClose(lang_rank, reason, sent_tokens, bool(flags & FLAG_ASK))
        if flags & FLAG_ASK:
            raise ProtocolError("PAIR_DOWN asks for an idle close without FLAG_IDLE")
        return PairDown(lang_rank, reason)
    return Reject(room, sent_tokens, reason)
