"""disagg: move multimodal embeddings from vision-encoder ranks to LLM prefill
ranks over torch.distributed point-to-point, with ZeroMQ for control.

See README.md (usage) and disagg/README.md (layers)."""

from .affinity import affinity
from .config import DisaggConfig
from .context import Context, init
from .embedding import Sender
from .errors import (
    DisaggError,
    Failure,
    FailureCause,
    GeometryMismatch,
    LockstepError,
    PeerLost,
    PoolFull,
    ProtocolError,
    StreamBroken,
    TransferTimeout,
)
from .items import Item
from .join import join
from .language import Receiver
from .queue import RoomQueue
from .types import EmbeddingResult, TransferStatus

__all__ = [
    "Context",
    "DisaggConfig",
    "DisaggError",
    "EmbeddingResult",
    "Failure",
    "FailureCause",
    "GeometryMismatch",
    "Item",
    "LockstepError",
    "PeerLost",
    "PoolFull",
    "ProtocolError",
    "Receiver",
    "RoomQueue",
    "Sender",
    "StreamBroken",
    "TransferStatus",
    "TransferTimeout",
    "affinity",
    "init",
    "join",
]
__version__ = "0.1.0"
