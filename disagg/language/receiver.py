"""Language side: the public `Receiver` handle. Every TP rank of an instance
makes the same calls on it (see `disagg.language.machine` for its states)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..types import EmbeddingResult, TransferStatus

if TYPE_CHECKING:
    from .engine import LanguageEngine
    from .machine import RecvRoom


def check_tokens(call: str, num_tokens: object) -> None:
    if num_tokens is not None and (isinstance(num_tokens, bool) or not isinstance(
            num_tokens, int) or num_tokens < 1):
        raise ValueError(f"{call}(num_tokens={num_tokens!r}): must be an int >= 1 or None")


class Receiver:
    """One room on a Language rank: `init`, then `poll` (and `resume` when
    `needs_resume`) until SUCCESS or FAILED, then `result`."""

    def __init__(self, engine: LanguageEngine, state: RecvRoom) -> None:
        self._engine = engine
        self._r = state
        self.room = state.room
        self.src_rank = state.src_rank

    def init(self, num_tokens: int | None = None) -> bool:
        """Allocate (default_alloc_tokens if None) and send ALLOC. False: no free
        blocks yet, or the room failed (see poll()); call again later. A repeat
        after success does nothing."""
        return self._engine._init(self._r, num_tokens)

    def poll(self) -> TransferStatus:
        return self._r.status

    @property
    def needs_resume(self) -> bool:
        """A partial chunk landed and nothing is asked for the rest yet."""
        return self._engine._needs_resume(self._r)

    @property
    def progress(self) -> tuple[int, int | None]:
        """(tokens received, seq_len once the first chunk told it)."""
        return self._r.received, self._r.seq_len

    @property
    def failure(self) -> str | None:
        return self._r.failure

    def wait(self, timeout_s: float | None = None) -> TransferStatus:
        """Block until the room is SUCCESS or FAILED or `needs_resume`, or
        `timeout_s` (default: bootstrap_timeout + peer_timeout) passed; return
        the status then. For loops that would rather sleep than poll."""
        return self._engine._wait(self._r, timeout_s)

    def resume(self, num_tokens: int | None = None) -> bool:
        """Allocate for the rest (or num_tokens of it) and send RESUME. False: no
        blocks yet (or the room failed); a repeat in the same round does nothing."""
        return self._engine._resume(self._r, num_tokens)

    def result(self) -> EmbeddingResult:
        """The received tensors; raises `DisaggError` unless SUCCESS."""
        return self._engine._result(self._r)

    def abort(self, reason: str = "aborted") -> None:
        """Fail the room; its blocks return once the frame owed for them arrives."""
        self._engine._abort(self._r, reason)
