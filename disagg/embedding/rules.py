"""Embedding side: the one rule for an ALLOC that meets other ALLOCs of its
room, whether the room has its `sender()` yet (`machine.alloc`) or not
(`lobby.Lobby.add_alloc`), so both answer it the same way. Pure."""

from __future__ import annotations

from collections.abc import Callable, Mapping


def alloc_conflict(scatter_by_rank: Mapping[int, bool], known_instance_size: int | None,
                   lang: int, scatter: bool, instance_size: int,
                   other_instance: Callable[[int, int], str | None]) -> tuple[str, bool] | None:
    """Why an ALLOC from Language rank `lang` may not join a room that the ranks
    of `scatter_by_rank` (rank -> asked for fanout="scatter") already asked
    for, and whether that fails the room; None when it may.

    A rank of another instance may not join: only its own ALLOC is refused
    (the room is that other instance's, and carries on). A rank of the room's
    own instance that contradicts it (a second ALLOC, another instance size,
    another fanout) makes the instance's view of the room inconsistent: the
    room fails, and every rank that asked is answered."""
    first = next(iter(scatter_by_rank), None)
    if first is not None:
        intruder = other_instance(lang, first)
        if intruder is not None:
            return intruder, False
    if lang in scatter_by_rank:
        return "duplicate ALLOC from this language rank", True
    if known_instance_size not in (None, instance_size):
        return f"instance_size={instance_size} disagrees with {known_instance_size}", True
    if first is not None and scatter_by_rank[first] != scatter:
        return (f"fanout={'scatter' if scatter else 'copy'} disagrees with the instance's "
                f"other ranks", True)
    return None
