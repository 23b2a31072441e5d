"""The engine protocol: what the candidate pipeline needs from a teacher engine, and nothing more.

Two batched operations (design.md §5): ``generate`` samples responses, ``score`` returns the teacher's exact
T=1 full-vocabulary log-probs along given sequences. Adding an engine touches one file: implement
``GenerationEngine`` and register it in ``brts.server.engines``.

EOS convention (the proto's): a sample that stopped on EOS ends with exactly one EOS token and has
``finish_reason == "stop"``; a sample cut at ``max_new_tokens`` has ``"length"`` and no trailing EOS. Lengths
come from the engine, never from ``id != pad``, because pad may equal EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from brts.shared.topk import TopK

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings that change the distribution (and so belong in a cache key)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = -1  # -1 = off
    max_new_tokens: int = 7168

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k: must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt and one seed per wanted sample: sample i is reproducible from ``seeds[i]`` whatever the batch."""

    prompt_ids: tuple[int, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Generation:
    token_ids: tuple[int, ...]
    finish_reason: FinishReason


@dataclass(frozen=True)
class ScoreItem:
    """A sequence to score: prompt + response ids, where the response starts (>= 1), optional ids per position.

    ``candidate_ids`` is int [len(token_ids) - response_start, K']: row t holds ids whose log-probs are wanted
    at the position predicting ``token_ids[response_start + t]``; -1 entries get -inf.
    """

    token_ids: tuple[int, ...]
    response_start: int
    candidate_ids: np.ndarray | None = None


@dataclass(frozen=True)
class ScoreOutput:
    """Row t predicts ``token_ids[response_start + t]``: the teacher's top-K there and its log-probs at the
    given candidate ids (float32 [rows, K'], or None when none were given)."""

    topk: TopK
    candidate_logprobs: np.ndarray | None


@runtime_checkable
class Scorer(Protocol):
    """Exact teacher log-probs at T=1, normalised over the full vocabulary."""

    vocab_size: int

    def score(self, items: Sequence[ScoreItem], k: int) -> list[ScoreOutput]: ...


@runtime_checkable
class GenerationEngine(Protocol):
    """A teacher sampler. ``vocab_size`` is the logits dimension (may exceed the tokenizer's length)."""

    name: str
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[list[Generation]]:
        """All prompts × samples in one call; returns, per request, one Generation per seed, in seed order."""
        ...

    def close(self) -> None: ...


def check_token_ids(ids: Sequence[int], vocab_size: int, max_context: int, field: str) -> None:
    """Reject empty, out-of-vocabulary or over-long id sequences with a ValueError naming ``field``."""
    if len(ids) == 0:
        raise ValueError(f"{field}: must not be empty")
    if len(ids) > max_context:
        raise ValueError(f"{field}: {len(ids)} tokens exceed the engine's context of {max_context}")
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{field}: token ids must be integers")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        raise ValueError(f"{field}: token id {int(arr[bad[0]])} at position {int(bad[0])} is outside 0..{vocab_size - 1}")
