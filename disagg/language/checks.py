"""Language side: what a frame must agree with before it may land. Pure
checks the room's machine makes of each meta frame: the allocation it answers
(`owed`), its sizes and flags against that allocation (`check_meta`), a
pre-posted frame's against what was posted (`prepost_matches`), and the first
chunk's aux values. A frame that cannot be trusted raises `StreamBroken`
(the pair's stream is given up); one that is well formed but cannot be the
room's data is *spoiled*: it still lands, for the stream's sake, and the room
fails once it has."""

from __future__ import annotations

import dataclasses

from ..errors import StreamBroken
from ..meta import FrameKind, Meta
from ..plan import span
from ..wire import MAX_INLINE_AUX
from .credit import Credit
from .room import Chunk, RecvRoom


class FrameChecks:
    """The checking half of `RecvMachine`."""

    rank: int
    instance_size: int
    slice_index: int | None

    def span(self, seq_len: int) -> tuple[int, int]:
        """Tokens [lo, hi) of a `seq_len`-token room that this rank receives."""
        return span(seq_len, self.instance_size, self.slice_index)

    def owed(self, r: RecvRoom | None, src: int, m: Meta) -> Credit:
        """The allocation a frame from `src` answers: a frame for a room with
        nothing outstanding towards `src` means the stream cannot be trusted."""
        if r is None or r.src_rank != src or r.outstanding is None:
            raise StreamBroken(f"language rank {self.rank}: {m.kind.name} frame for room "
                               f"{m.room}, which has nothing outstanding towards embedding "
                               f"rank {src}")
        return r.outstanding

    def check_meta(self, r: RecvRoom, a: Credit, m: Meta) -> Chunk:
        """Sizes must match the allocation exactly, else the stream is broken."""

        def broken(why: str) -> StreamBroken:
            return StreamBroken(f"language rank {self.rank}: room {r.room} chunk from "
                                f"embedding rank {r.src_rank}: {why}", room=r.room)

        if m.kind is not FrameKind.DATA:
            raise broken(f"unexpected {m.kind.name} frame")

        # a.key: tokens of our span landed before this allocation; 0 for the ALLOC
        if m.first != (a.key == 0):
            raise broken(f"FIRST flag does not match the allocation at {a.key} tokens")
        corrupt = None
        if m.first:
            if m.seq_len < 1:
                raise broken(f"seq_len={m.seq_len}")
            seq_len = m.seq_len
            lo, hi = self.span(seq_len)
            if r.declared_seq_len and m.seq_len != r.declared_seq_len:
                # the Embedding rank answers such an ALLOC with ABORT; this is the backstop
                corrupt = (f"language rank {self.rank}: room {r.room} has {m.seq_len} tokens, "
                           f"but seq_len={r.declared_seq_len} was declared")
        else:
            assert r.seq_len is not None and r.span is not None
            seq_len, (lo, hi) = r.seq_len, r.span
            if (m.seq_len != r.seq_len or m.num_aux != len(r.aux)
                    or m.aux != r.aux[:MAX_INLINE_AUX]):
                corrupt = (f"language rank {self.rank}: chunk {m.chunk_index} of room {r.room} "
                           f"says seq_len={m.seq_len} aux={m.aux} ({m.num_aux} values), "
                           f"first chunk said seq_len={r.seq_len} aux="
                           f"{r.aux[:MAX_INLINE_AUX]} ({len(r.aux)} values)")
        if m.token_offset != lo + a.key or m.chunk_index != r.chunk_index:
            raise broken(f"token_offset={m.token_offset} chunk_index={m.chunk_index}, "
                         f"expected {lo + a.key} and {r.chunk_index}")
        # min(remaining, allocated), or fewer when the sender has not been given
        # more of the room yet (progressive send): the rest follows a resume. An
        # empty span (scatter, a room shorter than the instance) is one meta frame.
        expect = min(hi - m.token_offset, a.allocated_tokens)
        if not min(1, hi - lo) <= m.num_tokens <= expect:
            raise broken(f"num_tokens={m.num_tokens}, expected at most {expect} "
                         f"(seq_len {seq_len}, tokens [{lo}, {hi}) here, allocated "
                         f"{a.allocated_tokens})")
        last = m.token_offset + m.num_tokens == hi
        if m.last != last:
            raise broken("LAST flag does not match the token count")
        return Chunk(m.num_tokens, m.token_offset, last, corrupt)

    @staticmethod
    def spoiled(chunk: Chunk, why: str) -> Chunk:
        """A chunk that cannot be the room's data (no output to land in, aux values
        that disagree): it still lands, for the stream's sake, and the room
        fails once it has (`landed`). The first reason stands."""
        return chunk if chunk.corrupt is not None else dataclasses.replace(chunk, corrupt=why)

    def output_failed(self, r: RecvRoom, chunk: Chunk, err: BaseException) -> Chunk:
        """The room's result tensors could not be made for its first chunk."""
        return self.spoiled(chunk, f"language rank {self.rank}: cannot allocate room "
                                   f"{r.room}'s output: {err}")

    def prepost_matches(self, r: RecvRoom, a: Credit, chunk: Chunk, room: RecvRoom,
                        credit: Credit, num_tokens: int, token_offset: int,
                        scratch: bool) -> Chunk:
        """A DATA meta arrived where a pre-posted frame's recvs wait: it must be
        exactly that frame (else the stream cannot be trusted); one posted into
        scratch (no output could be made when it was asked for) is no data."""
        if (r is not room or a is not credit or chunk.num_tokens != num_tokens
                or chunk.token_offset != token_offset):
            raise StreamBroken(f"language rank {self.rank}: room {r.room}'s chunk of "
                               f"{chunk.num_tokens} tokens at {chunk.token_offset} is not "
                               f"the pre-posted one ({num_tokens} at {token_offset} of "
                               f"room {room.room})", room=r.room)
        if not scratch:
            return chunk
        return self.spoiled(chunk, f"language rank {self.rank}: could not allocate room "
                                   f"{r.room}'s output when its first chunk was asked for")

    def aux_landed(self, r: RecvRoom, values: tuple[int, ...]) -> None:
        """A first chunk's aux values (more than the meta holds) landed after its
        payload: the meta's inline ones must be their head."""
        if values[:len(r.aux)] != r.aux and r.landing_chunk is not None:
            r.landing_chunk = self.spoiled(r.landing_chunk, f"language rank {self.rank}: "
                                           f"room {r.room}'s aux values disagree with its "
                                           f"meta frame")
        r.aux = values
