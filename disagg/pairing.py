"""Jobs mode: one (Embedding, Language) pair's group, formed. Both ends say
hello in the store and wait for the other's (so both constructors meet within
milliseconds), then each calls the backend's own constructor on the pair's
prefix of the store, with fixed ranks: Embedding 0, Language 1."""

from __future__ import annotations

import contextlib
import datetime
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

HELLO_POLL_S = (0.002, 0.05)  # a forming pair looks for its peer's hello this often (first, at most)


def hello(store: dist.Store, base: str, mine: str, theirs: str, wanted: Callable[[], bool],
      stop: threading.Event) -> bool:
    """Say this rank is ready to construct the pair, and wait for the peer to
    say so, for as long as it is a member and this rank runs. A hello stands
    only while its rank waits for this very pair in a thread of its own, so
    both constructors meet: there is no stale hello, and no two pairs
    wait on each other."""
    store.set(f"{base}/hello/{mine}", "1")
    delay = HELLO_POLL_S[0]
    while not stop.is_set():
        if not wanted():
            break
        try:  # check, not wait: a store wait that times out logs a warning each time
            if store.check([f"{base}/hello/{theirs}"]):
                return True
        except (RuntimeError, dist.DistError):
            pass  # the store is away: look again
        stop.wait(delay)
        delay = min(delay * 2, HELLO_POLL_S[1])
    with contextlib.suppress(RuntimeError, dist.DistError):
        store.delete_key(f"{base}/hello/{mine}")
    return False


def pair_group(store: dist.Store, base: str, embedding: bool, device: torch.device,
               timeout_s: float) -> dist.ProcessGroup:
    """The pair's two-rank group on `base`'s prefix of the store (this end's
    rank: 0 on the Embedding side); returns once both ends constructed it."""
    timeout = datetime.timedelta(seconds=timeout_s)
    prefix = dist.PrefixStore(f"{base}/pg", store)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefix, 0 if embedding else 1, 2,  # type: ignore[return-value]
                                     opts)
    return dist.ProcessGroupGloo(prefix, 0 if embedding else 1, 2,  # type: ignore[return-value]
                                 timeout)
