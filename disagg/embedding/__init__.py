"""Embedding side: serve each room's embeddings to the Language ranks that ask.

    Language --ALLOC(blocks)------------>  Embedding   (before or after send())
    Language <--meta, payload (chunk 0)--  Embedding   (once data and ALLOC are both here)
    Language --RESUME(sent_tokens, ...)->  Embedding   (only if chunk 0 was partial)
    Language <--meta, payload (chunk 1)--  ...          until the last chunk

Modules: `machine` (the room's states and transitions, pure), `lobby` (what
is known of rooms before `sender()`), `stream` (the per-pair send streams: the
only transport calls), `engine` (lock, tables, executes the machine's
actions), `sender` (the public handle and input checks).
"""

from .engine import EmbeddingEngine
from .sender import Sender

__all__ = ["EmbeddingEngine", "Sender"]
