"""Language side: what the machine asks the engine to do, in order."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FailureCause
from ..types import TransferStatus
from ..wire import Abort, Alloc, Resume
from .credit import Credit


@dataclass(frozen=True)
class Post:
    """Send a control message to the room's Embedding rank."""

    msg: Alloc | Resume | Abort


@dataclass(frozen=True)
class Owe:
    """One more frame is owed on the room's pair: its receiver reads on."""


@dataclass(frozen=True)
class Prepost:
    """Have the pair's receiver post the recvs of the frame that answers
    `credit` now (its meta, then `num_tokens` tokens at `token_offset`), before
    anything arrives; the allocation told the Embedding rank so (FLAG_PREPOSTED)."""

    credit: Credit
    num_tokens: int
    token_offset: int


@dataclass(frozen=True)
class Disown:
    """A frame counted as owed will not come (its ALLOC or RESUME was not sent)."""


@dataclass(frozen=True)
class Release:
    credit: Credit


@dataclass(frozen=True)
class AskResume:
    """Try to allocate the next chunk (auto resume) after `landed` tokens."""

    landed: int
    at_least: int = 1


@dataclass(frozen=True)
class CountFailure:
    cause: FailureCause


@dataclass(frozen=True)
class Untrack:
    """Forget the room: nothing can land in its blocks any more."""


@dataclass(frozen=True)
class Publish:
    """Publish a final status: last, after blocks and the room id are free."""

    status: TransferStatus


Action = Post | Owe | Prepost | Disown | Release | AskResume | CountFailure | Untrack | Publish
