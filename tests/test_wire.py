"""Pure layer (cheapest first): wire formats, bytes in and bytes out.

ZeroMQ control messages (ALLOC / RESUME / ABORT / REJECT) and the data plane's
meta frame, with no socket in sight: round trips for arbitrary valid fields,
and every malformed input ends in `ProtocolError` saying what is wrong.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.control import MAX_MESSAGE_BYTES
from disagg.errors import ProtocolError
from disagg.meta import FLAG_FIRST, FLAG_LAST, META_LEN, META_MAGIC, FrameKind, Meta, _check
from disagg.wire import (
    FLAG_ASK,
    FLAG_DIRECT,
    FLAG_IDLE,
    FLAG_ITEMS,
    HEADER_SIZE,
    MAGIC,
    MAX_AUX,
    MAX_BLOCKS_PER_MESSAGE,
    MAX_INLINE_AUX,
    MAX_ITEMS_PER_MESSAGE,
    MAX_REASON_BYTES,
    MAX_ROOM,
    VERSION,
    Abort,
    Alloc,
    AllocItem,
    Heartbeat,
    MsgKind,
    PairClose,
    PairDown,
    Reject,
    Resume,
    decode,
    encode,
    peek_room,
)

FAST = settings(max_examples=200, deadline=None)

HEADER = struct.Struct("<HBBIqiiqqI")
I32 = st.integers(-(2**31), 2**31 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)
ROOMS = st.integers(0, MAX_ROOM)
BLOCKS = st.lists(st.integers(0, 2**31 - 1), max_size=64).map(tuple)
# <= 256 code points is <= 1024 UTF-8 bytes, so the reason survives whole
REASONS = st.text(max_size=256)

allocs = st.builds(Alloc, room=ROOMS, lang_rank=I32, instance_size=I32, block_ids=BLOCKS,
                   allocated_tokens=I64, direct=st.booleans())
resumes = st.builds(Resume, room=ROOMS, lang_rank=I32, sent_tokens=I64, block_ids=BLOCKS,
                    allocated_tokens=I64, direct=st.booleans())
aborts = st.builds(Abort, room=ROOMS, lang_rank=I32, reason=REASONS)
rejects = st.builds(Reject, room=ROOMS, sent_tokens=I64, reason=REASONS)
closes = st.builds(PairClose, rank=I32, reason=REASONS, gen=st.integers(0, 2**63 - 1),
                   ask=st.booleans())
messages = st.one_of(allocs, resumes, aborts, rejects)


def header(*, magic=MAGIC, version=VERSION, kind=MsgKind.ALLOC, flags=0, room=7, lang_rank=1,
           instance_size=2, sent_tokens=0, allocated_tokens=256, num_items=0) -> bytes:
    return HEADER.pack(magic, version, int(kind), flags, room, lang_rank, instance_size,
                       sent_tokens, allocated_tokens, num_items)


# ------------------------------------------------------------------ control messages


def test_header_is_44_bytes():
    assert HEADER_SIZE == 44 == HEADER.size


@FAST
@given(messages)
def test_round_trip(msg):
    data = encode(msg)
    assert decode(data) == msg
    assert peek_room(data) == msg.room


@FAST
@given(closes)
def test_pair_close_round_trips(msg):
    assert decode(encode(msg)) == msg


def test_pair_close_is_a_pair_down_with_flag_idle_and_stays_itself():
    data = encode(PairClose(3, "idle", gen=7, ask=True))
    _, _, kind, flags, *_ = HEADER.unpack_from(data)
    assert kind == MsgKind.PAIR_DOWN and flags == FLAG_IDLE | FLAG_ASK
    assert decode(data) == PairClose(3, "idle", gen=7, ask=True)
    assert decode(encode(PairDown(3, "gone"))) == PairDown(3, "gone")  # not a PairClose
    with pytest.raises(ProtocolError, match="generation -1"):
        decode(header(kind=MsgKind.PAIR_DOWN, flags=FLAG_IDLE, sent_tokens=-1))
    with pytest.raises(ProtocolError, match="without FLAG_IDLE"):
        decode(header(kind=MsgKind.PAIR_DOWN, flags=FLAG_ASK))


def test_alloc_exact_bytes():
    msg = Alloc(room=5, lang_rank=3, instance_size=2, block_ids=(10, 11, 12),
                allocated_tokens=384)
    data = encode(msg)
    assert data == (header(kind=MsgKind.ALLOC, room=5, lang_rank=3, instance_size=2,
                           allocated_tokens=384, num_items=3)
                    + struct.pack("<3i", 10, 11, 12))
    assert len(data) == HEADER_SIZE + 12


def test_direct_resume_without_blocks_round_trips():
    msg = Resume(room=1, lang_rank=4, sent_tokens=8064, block_ids=(), allocated_tokens=1936,
                 direct=True)
    data = encode(msg)
    assert len(data) == HEADER_SIZE
    assert HEADER.unpack(data)[3] == FLAG_DIRECT
    assert decode(data) == msg


def test_long_reason_is_cut_at_a_character_boundary():
    reason = "é" * 600 + "x"  # 1201 UTF-8 bytes; the limit falls inside an "é"
    data = encode(Abort(room=3, lang_rank=0, reason=reason))
    got = decode(data)
    assert isinstance(got, Abort)
    assert got.reason == "é" * 510 + " ..."  # no word end to cut at: whole characters
    assert len(got.reason.encode()) <= MAX_REASON_BYTES


@FAST
@given(st.text(min_size=200, max_size=2000))
def test_any_reason_decodes_to_a_prefix_within_the_limit(reason):
    got = decode(encode(Reject(room=1, sent_tokens=-1, reason=reason)))
    cut = got.reason.removesuffix(" ...") if got.reason != reason else reason
    assert reason.startswith(cut)  # a prefix, marked when cut
    assert len(got.reason.encode()) <= MAX_REASON_BYTES
    if len(reason.encode()) <= MAX_REASON_BYTES:
        assert got.reason == reason


def test_encode_refuses_non_messages_and_too_many_blocks():
    with pytest.raises(TypeError):
        encode("ALLOC")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="blocks in one message"):
        encode(Alloc(1, 0, 1, tuple(range(MAX_BLOCKS_PER_MESSAGE + 1)), 0))


@FAST
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_protocol_error(data):
    try:
        msg = decode(data)
    except ProtocolError:
        return
    assert decode(encode(msg)) == msg


@st.composite
def plausible_messages(draw):
    """A well-formed-looking header with random fields and a random body: reaches
    the deep checks that random bytes almost never get past the magic for."""
    head = HEADER.pack(
        draw(st.sampled_from([MAGIC, MAGIC, MAGIC, 0, 0x5AD1])),
        draw(st.sampled_from([VERSION, VERSION, VERSION, 0, 1, VERSION + 1, 255])),
        draw(st.integers(0, 255) | st.sampled_from(list(MsgKind))),
        draw(st.sampled_from([0, FLAG_DIRECT, 2, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1)),
        draw(I64), draw(I32), draw(I32), draw(I64), draw(I64),
        draw(st.integers(0, 64) | st.integers(0, 2**32 - 1)))
    body = draw(st.binary(max_size=300))
    return head + body


@FAST
@given(plausible_messages())
def test_plausible_garbage_only_ever_raises_protocol_error(data):
    try:
        msg = decode(data)
    except ProtocolError as e:
        assert str(e)  # says something
        return
    assert isinstance(msg, (Alloc, Resume, Abort, Reject, Heartbeat, PairDown))
    if not isinstance(msg, (Heartbeat, PairDown)):  # those name a rank, not a room
        assert 0 <= msg.room <= MAX_ROOM
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize("cut", [0, 1, HEADER_SIZE - 1])
def test_truncated_header(cut):
    data = encode(Alloc(1, 0, 1, (1, 2), 256))
    with pytest.raises(ProtocolError, match=f"truncated control message: {cut} bytes"):
        decode(data[:cut])
    assert peek_room(data[:cut]) is None


@pytest.mark.parametrize("kind", [MsgKind.ALLOC, MsgKind.RESUME])
def test_truncated_block_list(kind):
    data = header(kind=kind, room=9, num_items=3) + struct.pack("<2i", 1, 2)
    with pytest.raises(ProtocolError, match=f"{kind.name} announces 3 blocks but carries 8 "
                                            r"bytes \[room=9\]") as ei:
        decode(data)
    assert ei.value.room == 9


def test_block_count_mismatch_too_many_bytes():
    data = header(num_items=1) + struct.pack("<2i", 1, 2)
    with pytest.raises(ProtocolError, match="announces 1 blocks but carries 8 bytes"):
        decode(data)


def test_block_bytes_not_a_whole_int32():
    with pytest.raises(ProtocolError, match="announces 1 blocks but carries 5 bytes"):
        decode(header(num_items=1) + b"\x01\x00\x00\x00\x00")


@pytest.mark.parametrize("kind", [MsgKind.ABORT, MsgKind.REJECT])
def test_truncated_reason(kind):
    data = header(kind=kind, room=4, num_items=10) + b"short"
    with pytest.raises(ProtocolError, match=f"{kind.name} reason length 10 does not match 5 "
                                            "bytes"):
        decode(data)


def test_wrong_magic():
    data = b"\x00\x00" + encode(Alloc(1, 0, 1, (), 0))[2:]
    with pytest.raises(ProtocolError, match="bad magic 0x0000"):
        decode(data)


@pytest.mark.parametrize("version", [0, 1, VERSION + 1, 255])
def test_wrong_version(version):
    with pytest.raises(ProtocolError, match=f"unsupported protocol version {version} "
                                            f"\\(this side speaks {VERSION}\\)"):
        decode(header(version=version))


@pytest.mark.parametrize("kind", [0, 7, 255])
def test_unknown_kind(kind):
    with pytest.raises(ProtocolError, match=f"unknown message kind {kind}"):
        decode(header(kind=kind))


@pytest.mark.parametrize("flags", [2, 32, 0x80000000, 0xFFFFFFFF])
def test_unknown_flags(flags):
    with pytest.raises(ProtocolError, match=f"unknown flags 0x{flags:x}"):
        decode(header(flags=flags))


@pytest.mark.parametrize("kind", [MsgKind.RESUME, MsgKind.ABORT, MsgKind.REJECT])
def test_scatter_flag_only_on_alloc(kind):
    with pytest.raises(ProtocolError, match="unknown flags 0x4"):
        decode(header(kind=kind, flags=4))


def test_preposted_flag_roundtrips_and_an_alloc_needs_a_declared_length():
    a = Alloc(7, 1, 2, (0, 1), 32, False, 40, preposted=True)
    assert decode(encode(a)) == a
    r = Resume(7, 1, 16, (), 32, True, preposted=True)
    assert decode(encode(r)) == r
    with pytest.raises(ProtocolError, match="posted recvs declares no seq_len"):
        decode(encode(dataclasses.replace(a, seq_len=0)))
    with pytest.raises(ProtocolError, match="unknown flags 0x8"):
        decode(header(kind=MsgKind.ABORT, flags=8))


def test_a_preposted_resume_carries_the_tokens_its_recvs_expect():
    """What sizes every answer to it, a refusal after the room ended or its id
    was reused included: in range of the allocation, and only when pre-posted."""
    r = Resume(7, 1, 16, (2, 3), 32, False, preposted=True, posted_tokens=20)
    assert decode(encode(r)).posted_tokens == 20
    # past its allocation: decoded, so that it can be refused padded to that count
    assert decode(encode(dataclasses.replace(r, posted_tokens=33))).posted_tokens == 33
    with pytest.raises(ProtocolError, match="expect -1 tokens"):
        decode(encode(dataclasses.replace(r, posted_tokens=-1)))
    with pytest.raises(ProtocolError, match=r"pre-posted: False\) says its recvs expect 5"):
        decode(encode(dataclasses.replace(r, preposted=False, posted_tokens=5)))


def test_goodbye_counts_the_frames_sent():
    assert decode(encode(Heartbeat(0, bye=True, frames=12345))) == Heartbeat(0, True, 12345)
    assert decode(encode(Heartbeat(3))).frames == -1


def test_alloc_scatter_flag_roundtrips():
    a = Alloc(7, 1, 2, (0, 1), 2 * 16, True, 1000, scatter=True)
    assert decode(encode(a)) == a
    assert decode(encode(dataclasses.replace(a, scatter=False))).scatter is False


@pytest.mark.parametrize("room", [-1, -(2**63)])
def test_negative_room(room):
    data = header(room=room)
    with pytest.raises(ProtocolError, match=f"negative room id {room}"):
        decode(data)
    assert peek_room(data) is None


def test_huge_announced_block_count():
    n = MAX_BLOCKS_PER_MESSAGE + 1
    with pytest.raises(ProtocolError, match=f"{n} blocks exceeds the limit "
                                            f"{MAX_BLOCKS_PER_MESSAGE}"):
        decode(header(num_items=n))
    with pytest.raises(ProtocolError, match="4294967295 blocks exceeds the limit"):
        decode(header(kind=MsgKind.RESUME, num_items=2**32 - 1))


@pytest.mark.parametrize("kind", [MsgKind.ABORT, MsgKind.REJECT])
def test_huge_announced_reason(kind):
    n = MAX_REASON_BYTES + 1
    data = header(kind=kind, num_items=n) + b"a" * n
    with pytest.raises(ProtocolError, match=f"reason length {n} .* \\(limit {MAX_REASON_BYTES}"):
        decode(data)


@pytest.mark.parametrize("kind", [MsgKind.ABORT, MsgKind.REJECT])
def test_non_utf8_reason(kind):
    body = b"\xff\xfe bad"
    data = header(kind=kind, room=12, num_items=len(body)) + body
    with pytest.raises(ProtocolError, match=rf"{kind.name} reason is not UTF-8 \[room=12\]"):
        decode(data)


def test_peek_room_reads_room_of_a_bad_message():
    data = header(room=77, num_items=3)  # blocks missing: undecodable, but names its room
    with pytest.raises(ProtocolError):
        decode(data)
    assert peek_room(data) == 77


# ------------------------------------------------------------------ meta frame

metas = st.builds(
    Meta,
    kind=st.sampled_from(list(FrameKind)),
    room=ROOMS,
    chunk_index=st.integers(0, 2**31),
    token_offset=st.integers(0, 2**40),
    num_tokens=st.integers(0, 2**40),
    seq_len=st.integers(0, 2**40),
    flags=st.sampled_from([0, FLAG_FIRST, FLAG_LAST, FLAG_FIRST | FLAG_LAST]),
    aux=st.lists(I64, max_size=MAX_INLINE_AUX).map(tuple),
)


@FAST
@given(metas)
def test_meta_round_trip(meta):
    t = meta.to_tensor()
    assert t.dtype == torch.int64
    assert tuple(t.shape) == (META_LEN,)
    assert Meta.from_tensor(t) == meta
    out = torch.full((META_LEN,), -7, dtype=torch.int64)
    assert meta.to_tensor(out) is out
    assert torch.equal(out, t)
    assert Meta.from_words(meta.words()) == meta


def test_meta_layout():
    m = Meta(FrameKind.DATA, room=42, chunk_index=1, token_offset=8064, num_tokens=1936,
             seq_len=10000, flags=FLAG_LAST, aux=(-5, 9))
    w = m.words()
    assert w[:-1] == [META_MAGIC, 1, 42, 1, 8064, 1936, 10000, FLAG_LAST, 2, -5, 9,
                      0, 0, 0, 0, 0, 0]
    assert len(w) == META_LEN
    assert m.last and not m.first
    assert Meta(FrameKind.DATA, 1, flags=FLAG_FIRST).first


def test_meta_aux_over_limit_is_rejected():
    m = Meta(FrameKind.DATA, room=1, aux=tuple(range(MAX_AUX + 1)))
    with pytest.raises(ValueError, match=f"at most {MAX_AUX} aux values, got {MAX_AUX + 1}"):
        m.to_tensor()
    long = Meta.from_words(Meta(FrameKind.DATA, 1, aux=tuple(range(MAX_AUX))).words())
    # the meta holds the first eight; the rest follow the first chunk's payload
    assert long.aux == tuple(range(MAX_INLINE_AUX)) and long.num_aux == MAX_AUX


def test_meta_num_aux_over_limit_on_the_wire_is_rejected():
    w = Meta(FrameKind.DATA, room=1).words()[:-1]
    w[8] = MAX_AUX + 1
    with pytest.raises(ProtocolError, match=f"num_aux={MAX_AUX + 1}"):
        Meta.from_words([*w, _check(w)])


@pytest.mark.parametrize("position", range(META_LEN))
def test_meta_corrupted_word_is_detected(position):
    m = Meta(FrameKind.DATA, room=123, chunk_index=2, token_offset=256, num_tokens=128,
             seq_len=1000, flags=FLAG_FIRST, aux=(-3,))
    w = m.words()
    w[position] = ~w[position]  # every bit of the word flipped
    with pytest.raises(ProtocolError):
        Meta.from_words(w)
    w = m.words()
    w[position] += 1
    with pytest.raises(ProtocolError):
        Meta.from_words(w)


@FAST
@given(metas, st.integers(0, META_LEN - 1), I64)
def test_meta_any_changed_word_is_detected(meta, position, value):
    w = meta.words()
    if (value - w[position]) % 2**63 == 0:
        return  # same word, or only its sign bit flipped: see the single-bit-flip test
    w[position] = value
    with pytest.raises(ProtocolError):
        Meta.from_words(w)


def test_meta_single_bit_flip_in_any_word_is_detected():
    # int64 words on the wire: flip each bit of each word, one at a time. The check
    # word must catch every one (magic and kind/num_aux are also checked on their own).
    m = Meta(FrameKind.DATA, room=123, chunk_index=2, token_offset=256, num_tokens=128,
             seq_len=1000, flags=FLAG_FIRST, aux=(-3, 7))

    def flip(x: int, bit: int) -> int:
        u = (x & (2**64 - 1)) ^ (1 << bit)
        return u - 2**64 if u >= 2**63 else u

    missed = []
    for position in range(META_LEN):
        for bit in range(64):
            w = m.words()
            w[position] = flip(w[position], bit)
            try:
                Meta.from_words(w)
            except ProtocolError:
                continue
            missed.append((position, bit))
    assert missed == [], f"undetected (word, bit) flips: {missed}"


def test_meta_wrong_length_magic_and_kind():
    w = Meta(FrameKind.CLOSE, room=1).words()
    with pytest.raises(ProtocolError, match=f"meta frame has {META_LEN - 1} words, expected "
                                            f"{META_LEN}"):
        Meta.from_words(w[:-1])
    with pytest.raises(ProtocolError, match=f"has {META_LEN + 1} words"):
        Meta.from_tensor(torch.tensor([*w, 0], dtype=torch.int64))
    bad = [META_MAGIC + 1, *w[1:-1]]  # another protocol version, correctly checked
    with pytest.raises(ProtocolError, match=f"bad meta magic/version 0x{META_MAGIC + 1:x}"):
        Meta.from_words([*bad, _check(bad)])
    bad = [w[0], 9, *w[2:-1]]
    with pytest.raises(ProtocolError, match="unknown frame kind 9"):
        Meta.from_words([*bad, _check(bad)])
    with pytest.raises(ProtocolError, match="check word mismatch"):
        Meta.from_words([*w[:-1], w[-1] ^ 1])


@FAST
@given(st.lists(I64, min_size=META_LEN, max_size=META_LEN))
def test_random_meta_words_are_rejected(words):
    # a payload read out of step with its sender must never pass for a meta frame
    with pytest.raises(ProtocolError):
        Meta.from_words(words)


@pytest.mark.parametrize("bye", [False, True])
def test_heartbeat_round_trip(bye):
    from disagg.wire import Heartbeat

    msg = Heartbeat(rank=3, bye=bye)
    assert decode(encode(msg)) == msg
    assert len(encode(msg)) == HEADER_SIZE


def test_heartbeat_with_body_or_unknown_flags_is_rejected():
    from disagg.wire import Heartbeat

    raw = encode(Heartbeat(rank=1))
    with pytest.raises(ProtocolError, match="malformed HEARTBEAT"):
        decode(raw + b"x")
    bad_flags = bytearray(raw)
    bad_flags[4] = 4  # flags word, low byte: neither 0 nor BYE
    with pytest.raises(ProtocolError, match="malformed HEARTBEAT"):
        decode(bytes(bad_flags))


def test_pair_down_round_trips_and_alloc_carries_the_declared_length():
    assert decode(encode(PairDown(3, "stream broke"))) == PairDown(3, "stream broke")
    a = Alloc(7, 1, 2, (0, 1), 2 * 16, False, 1000)
    assert decode(encode(a)) == a and decode(encode(a)).seq_len == 1000
    assert decode(encode(Alloc(7, 1, 2, (0,), 16))).seq_len == 0  # not declared
    w = bytearray(encode(Alloc(7, 1, 2, (0,), 16)))
    struct.pack_into("<q", w, 24, -5)  # the declared length's word: negative
    with pytest.raises(ProtocolError, match="declares seq_len=-5"):
        decode(bytes(w))


# ------------------------------------------------------------------ item tables (DESIGN 0.3)


@st.composite
def item_tables(draw):
    """A valid item table: entries in room order, disjoint, at least one token each."""
    n = draw(st.integers(1, 20))
    index, at, out = -1, 0, []
    for _ in range(n):
        index += draw(st.integers(1, 3))
        at += draw(st.integers(0, 50))
        k = draw(st.integers(1, 300))
        out.append(AllocItem(index, at, k, draw(st.booleans())))
        at += k
    return tuple(out)


@FAST
@given(item_tables())
def test_alloc_with_an_item_table_round_trips(items):
    # an item room's ALLOC declares what its source sends: the needed items' rows
    msg = Alloc(room=9, lang_rank=2, instance_size=1, block_ids=(1, 2), allocated_tokens=32,
                seq_len=sum(it.num_tokens for it in items if it.needed), items=items)
    data = encode(msg)
    assert HEADER.unpack_from(data)[3] & FLAG_ITEMS
    assert len(data) == HEADER_SIZE + 8 + 4 + 16 * len(items)
    assert decode(data) == msg
    assert len(data) <= MAX_MESSAGE_BYTES


def test_the_largest_alloc_fits_the_control_channel():
    items = tuple(AllocItem(i, i, 1, True) for i in range(MAX_ITEMS_PER_MESSAGE))
    data = encode(Alloc(1, 0, 1, tuple(range(MAX_BLOCKS_PER_MESSAGE)), 0,
                        seq_len=MAX_ITEMS_PER_MESSAGE, items=items))
    assert len(data) == MAX_MESSAGE_BYTES


@pytest.mark.parametrize(("entries", "why"), [
    ([], "0 items"),
    ([(0, 0, 4, 1), (0, 4, 4, 1)], "out of order"),  # an index twice
    ([(0, 0, 4, 1), (1, 3, 4, 1)], "out of order"),  # spans overlap
    ([(0, 0, 0, 1)], "out of order or empty"),
    ([(0, 0, 4, 2)], "needed flag"),
    ([(0, 0, 4, 1), (1, 4, 100, 0)], "needed items hold 4 tokens, but the ALLOC declares"),
    ([(0, 0, 50, 1), (1, 50, 1, 1)], "needed items hold 51 tokens"),
    ([(0, 2**31 - 2, 4, 1)], "past"),
])
def test_a_hostile_item_table_is_a_protocol_error(entries, why):
    table = struct.pack("<I", len(entries)) + b"".join(struct.pack("<iiii", *e) for e in entries)
    data = header(kind=MsgKind.ALLOC, flags=FLAG_ITEMS, sent_tokens=50, num_items=1) \
        + struct.pack("<i", 0) + table
    with pytest.raises(ProtocolError, match=why):
        decode(data)


def test_an_item_table_must_fit_its_bytes_and_only_an_alloc_may_carry_one():
    table = struct.pack("<I", 2) + struct.pack("<iiii", 0, 0, 4, 1)  # announces 2, carries 1
    with pytest.raises(ProtocolError, match="announces 2 items"):
        decode(header(kind=MsgKind.ALLOC, flags=FLAG_ITEMS) + table)
    with pytest.raises(ProtocolError, match="carries none"):
        decode(header(kind=MsgKind.ALLOC, flags=FLAG_ITEMS))
    with pytest.raises(ProtocolError, match="announces 5000 items"):
        decode(header(kind=MsgKind.ALLOC, flags=FLAG_ITEMS) + struct.pack("<I", 5000))
    with pytest.raises(ProtocolError, match="unknown flags"):
        decode(header(kind=MsgKind.RESUME, flags=FLAG_ITEMS) + table)
    with pytest.raises(ValueError, match="item table"):
        encode(Alloc(1, 0, 1, (), 0, items=()))
    with pytest.raises(ValueError, match="needed items hold 4 tokens"):
        encode(Alloc(1, 0, 1, (), 0, seq_len=9, items=(AllocItem(0, 0, 4, True),)))


def test_a_long_reason_is_cut_after_a_whole_word_never_inside_one() -> None:
    from disagg.errors import clip_reason
    words = "Connection closed by peer. This is typically caused by a remote worker crashing."
    cut = clip_reason(words * 40, 200)
    assert len(cut.encode()) <= 200 and cut.endswith(" ...")
    assert (words * 40).startswith(cut[:-4]) and (words * 40)[len(cut) - 4] == " "
    assert clip_reason("é" * 300, 101).encode().decode() == clip_reason("é" * 300, 101)
    assert clip_reason(words, 1000) == words
    msg = decode(encode(Reject(3, 0, words * 40)))
    assert isinstance(msg, Reject) and msg.reason.endswith(" ...")
    assert len(msg.reason.encode()) <= MAX_REASON_BYTES
