"""The data plane's meta frame, no I/O: `META_LEN` int64 words sent before
every frame's payload on a pair's stream (see `Meta`), the frame kinds and
flags, and an ABORT frame's in-band reason. The control messages that travel
beside it over ZeroMQ are `wire.py`'s."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .errors import ProtocolError, clip_reason
from .wire import MAX_AUX, MAX_INLINE_AUX, VERSION


class FrameKind(enum.IntEnum):
    DATA = 1
    ABORT = 2  # answers an allocation: nothing of this room follows; payload: its reason
    CLOSE = 3  # reserved: decoded and rejected as unexpected, never sent (a pair ends with its group)
    # a pre-posted allocation is not answered yet: filler of its sizes, so another
    # room's frame can go first; its answer comes later as an ordinary frame
    DEFER = 4


ABORT_REASON_BYTES = 256  # an ABORT frame's payload: its reason, UTF-8, NUL-padded


def reason_tensor(reason: str) -> torch.Tensor:
    raw = clip_reason(reason, ABORT_REASON_BYTES).encode("utf-8", errors="replace")
    raw = raw.decode("utf-8", errors="ignore").encode("utf-8")  # never cut a character
    out = torch.zeros(ABORT_REASON_BYTES, dtype=torch.uint8)
    out[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return out


def reason_from_tensor(t: torch.Tensor) -> str:
    raw = bytes(t.cpu().tolist()).split(b"\0", 1)[0]
    return raw.decode("utf-8", errors="replace")


FLAG_FIRST = 1
FLAG_LAST = 2
FLAG_GIVEN = 4  # DATA: the sender holds every token of the room (a RESUME may pre-post)
FLAG_PADDED = 8  # ABORT: filler of the pre-posted sizes comes first, then the reason
META_MAGIC = 0xD15A_0000 | VERSION
META_LEN = 10 + MAX_INLINE_AUX  # 18 words
_CHECK_SALT = 0x5EED_D15A_C0DE


@dataclass(frozen=True)
class Meta:
    """Header of one frame on a pair's stream.

    Words: magic|version, kind, room, chunk_index, token_offset, num_tokens,
    seq_len, flags, num_aux, aux[8], check. `seq_len` and aux are meaningful
    in the FIRST chunk; later chunks repeat them and the receiver checks they
    agree with what it cached. Up to `MAX_INLINE_AUX` aux values sit in the
    meta; a room with more (up to `MAX_AUX`) sends all of them as one extra
    int64 payload tensor at the end of its first chunk, and every meta carries
    `num_aux` and the first eight. Decoded, `aux` is what the meta holds (the
    first eight at most) and `num_aux` the room's count. `check` xors every
    other word with a salt so a frame read out of step with its sender is
    caught, not trusted.
    """

    kind: FrameKind
    room: int
    chunk_index: int = 0
    token_offset: int = 0
    num_tokens: int = 0
    seq_len: int = 0
    flags: int = 0
    aux: tuple[int, ...] = ()
    num_aux: int = -1  # -1: len(aux)

    def __post_init__(self) -> None:
        if self.num_aux == -1:
            object.__setattr__(self, "num_aux", len(self.aux))

    @property
    def inline_aux(self) -> tuple[int, ...]:
        return self.aux[:MAX_INLINE_AUX]

    @property
    def aux_follows(self) -> bool:
        """The room's aux values travel as a tensor after this (first) chunk's payload."""
        return self.first and self.num_aux > MAX_INLINE_AUX

    @property
    def first(self) -> bool:
        return bool(self.flags & FLAG_FIRST)

    @property
    def last(self) -> bool:
        return bool(self.flags & FLAG_LAST)

    def words(self) -> list[int]:
        if self.num_aux > MAX_AUX:
            raise ValueError(f"at most {MAX_AUX} aux values, got {self.num_aux}")
        inline = self.inline_aux
        w = [META_MAGIC, int(self.kind), self.room, self.chunk_index, self.token_offset,
             self.num_tokens, self.seq_len, self.flags, self.num_aux,
             *inline, *([0] * (MAX_INLINE_AUX - len(inline)))]
        return [*w, _check(w)]

    def to_tensor(self, out: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.tensor(self.words(), dtype=torch.int64)
        if out is None:
            return t
        out.copy_(t)
        return out

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Meta:
        return cls.from_words(t.tolist())

    @classmethod
    def from_words(cls, w: list[int]) -> Meta:
        if len(w) != META_LEN:
            raise ProtocolError(f"meta frame has {len(w)} words, expected {META_LEN}")
        if w[0] != META_MAGIC:
            raise ProtocolError(f"bad meta magic/version 0x{w[0] & 0xFFFFFFFFFFFFFFFF:x}")
        if _check(w[:-1]) != w[-1]:
            raise ProtocolError("meta frame check word mismatch")
        try:
            kind = FrameKind(w[1])
        except ValueError:
            raise ProtocolError(f"unknown frame kind {w[1]}") from None
        num_aux = w[8]
        if not 0 <= num_aux <= MAX_AUX:
            raise ProtocolError(f"meta frame num_aux={num_aux}")
        return cls(kind, w[2], w[3], w[4], w[5], w[6], w[7],
                   tuple(w[9:9 + min(num_aux, MAX_INLINE_AUX)]), num_aux)


def _check(words: list[int]) -> int:
    """Every bit of every word, sign bit included, reaches the check: an odd
    multiplier is a bijection mod 2**64. Returned as a signed int64."""
    acc = _CHECK_SALT
    for i, x in enumerate(words):
        acc ^= (x * (2 * i + 1)) & 0xFFFF_FFFF_FFFF_FFFF
    return acc - (1 << 64) if acc >= 1 << 63 else acc
