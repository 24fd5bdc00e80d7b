"""Language side: receive rooms from Embedding ranks into bounded memory.

Modules: `machine` (the room's phases and transitions, pure), `credit` (the
only code that takes or frees blocks; the "auto" first allocation), `stream`
(the per-pair receive threads: the only transport calls and the pool copy-out),
`engine` (lock, tables, executes the machine's actions), `receiver` (the
public handle).
"""

from .engine import LanguageEngine
from .receiver import Receiver

__all__ = ["LanguageEngine", "Receiver"]
