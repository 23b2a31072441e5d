"""Which prompts each rank trains on at each step, and the seeds and pool windows that go with them.

Why stateless: every draw is a pure function of (seed, step, rank, world size), so a resumed run draws exactly what
the uninterrupted run drew without saving any sampler state, and two runs with the same seed see the same
prompts. The dataset is walked as one endless stream of epochs, each a fresh permutation of all items seeded by
(seed, epoch); step s takes stream positions [s·P, (s+1)·P) and rank r takes every world-th of them.

Freshness (issue #8): which window of a prompt's append-only Tier-1 pool on the server a step asks for.
``cached`` always asks for [0, N) (the prewarmed pool; after the first epoch every request is a cache hit);
``per_epoch`` asks for [epoch·N, (epoch+1)·N) (new samples each time the prompt comes round again); ``per_step``
for [step·N, (step+1)·N). All three are deterministic in (seed, step), so a resume asks for the same windows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["PromptDraw", "PromptSampler", "keyed_seed", "pool_offset"]

FRESHNESS = ("cached", "per_epoch", "per_step")


@dataclass(frozen=True)
class PromptDraw:
    """One prompt of a step: the dataset item, its place in the stream and the epoch it belongs to."""

    item: int  # index into the dataset
    position: int  # global stream position: unique per (step, slot), the same on every rank
    epoch: int


def keyed_seed(*parts: int | str) -> int:
    """A 63-bit seed keyed by its parts, e.g. ``(seed, "rollout", step, position, j)``: the same parts give the same
    seed in any process and Python version (blake2b, unlike hash()), so a resumed run draws what the first drew."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def pool_offset(freshness: str, n_tier1: int, epoch: int, step: int) -> int:
    """The first index of the Tier-1 pool window a request asks for (see the module docstring)."""
    if freshness == "cached":
        return 0
    if freshness == "per_epoch":
        return epoch * n_tier1
    if freshness == "per_step":
        return step * n_tier1
    raise ValueError(f"freshness: must be one of {', '.join(FRESHNESS)}, got {freshness!r}")


class PromptSampler:
    """``PromptSampler(len(dataset), prompts_per_step, seed, rank, world).draw(step)`` → this rank's PromptDraws."""

    def __init__(self, n_items: int, prompts_per_step: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n_items < 1:
            raise ValueError("dataset: no usable prompts (is the file empty, or every prompt over max_prompt_len?)")
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step: must be >= 1, got {prompts_per_step}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in 0..{world_size - 1}, got {rank}")
        self.n_items, self.per_step, self.seed = n_items, prompts_per_step, seed
        self.rank, self.world_size = rank, world_size

    @lru_cache(maxsize=4)
    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.n_items)

    def draw_all(self, step: int) -> list[PromptDraw]:
        """Every rank's prompts of ``step``, in stream order."""
        if step < 0:
            raise ValueError(f"step: must be >= 0, got {step}")
        out = []
        for position in range(step * self.per_step, (step + 1) * self.per_step):
            epoch, offset = divmod(position, self.n_items)
            out.append(PromptDraw(int(self.permutation(epoch)[offset]), position, epoch))
        return out

    def draw(self, step: int) -> list[PromptDraw]:
        """This rank's shard of ``step`` (ranks beyond prompts_per_step get none and still take part)."""
        return self.draw_all(step)[self.rank :: self.world_size]
