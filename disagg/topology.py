"""Role split of the world: which ranks embed, which form each Language instance."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """Role split: ranks [0, E) embed; then instances of T consecutive Language ranks."""

    world_size: int
    num_embedding_ranks: int
    language_tp_size: int

    def __post_init__(self) -> None:
        e, t, w = self.num_embedding_ranks, self.language_tp_size, self.world_size
        if w <= e or (w - e) % t:
            raise ValueError(
                f"world_size={w} does not fit num_embedding_ranks={e} plus Language "
                f"instances of language_tp_size={t}: world_size must be {e} + k*{t} "
                f"with k >= 1 (e.g. {e + t} or {e + 2 * t})")

    @property
    def embedding_ranks(self) -> range:
        return range(self.num_embedding_ranks)

    @property
    def language_ranks(self) -> range:
        return range(self.num_embedding_ranks, self.world_size)

    @property
    def num_instances(self) -> int:
        return (self.world_size - self.num_embedding_ranks) // self.language_tp_size

    def role(self, rank: int) -> str:
        return "embedding" if rank < self.num_embedding_ranks else "language"

    def instance_of(self, rank: int) -> int | None:
        if rank < self.num_embedding_ranks:
            return None
        return (rank - self.num_embedding_ranks) // self.language_tp_size

    def index_in_instance(self, rank: int) -> int:
        """A Language rank's place in its instance (its TP rank)."""
        if rank < self.num_embedding_ranks:
            raise ValueError(f"rank {rank} is an embedding rank")
        return (rank - self.num_embedding_ranks) % self.language_tp_size

    def instance_ranks(self, instance: int) -> list[int]:
        start = self.num_embedding_ranks + instance * self.language_tp_size
        return list(range(start, start + self.language_tp_size))
