"""The candidate pipeline: Tier-1 samples, Tier-2 hinted rescue, and the teacher's top-K along every kept candidate.

Orchestration only (brts-reference §3-§5, §11, §14): the engine samples, ``brts.shared`` judges and hints,
the scorer scores. Per batch of prompts there is one generation call for every Tier-1 sample, one for every
Tier-2 attempt, and one scoring call for every kept candidate, so a serving engine sees the whole batch at once
(the reference generates per student row, with HF ``generate``, every step: §10).

What the reference gets wrong and we do not:
- Tier 2 runs only for prompts whose Tier-1 window is all wrong (the reference hints the whole batch).
- Hinted samples that talk about the key are recorded with ``leaked=True`` and not kept (§10 item 8).
- The top-K is always scored after the ORIGINAL prompt, never the hinted or perturbed one (§4.4, §11), at T=1
  over the full vocabulary (never the sampling distribution).
"""

from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from brts.shared.engines.base import (
    GenerationEngine,
    GenerationRequest,
    SamplingParams,
    Scorer,
    ScoreItem,
)
from brts.shared.answers import extract_boxed
from brts.shared.hints import hinted_prompt_ids, leaks
from brts.shared.topk import TopK
from brts.shared.verify import BoundedVerifier, is_correct_batch

TIER1, TIER2 = 1, 2
DEFAULT_PERTURBATION = "Please reason step by step and rethink in detail before giving the final answer."


def derive_seed(seed: int, pool_key: bytes | str, index: int) -> int:
    """Seed of sample ``index`` of a pool: a hash of (seed, pool key, index), so a pool grows append-only and
    sample i is the same draw whoever asks for it and in whatever batch (design.md §4)."""
    key = pool_key.encode() if isinstance(pool_key, str) else pool_key
    digest = hashlib.blake2b(struct.pack("<qq", seed, index) + key, digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF  # engines take non-negative 31-bit seeds


def prompt_key(prompt_ids: Sequence[int], tier: int, extra: str = "") -> bytes:
    """A default pool key for one prompt and tier; the cache uses its own key (teacher, sampling, ids)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(struct.pack(f"<i{len(prompt_ids)}i", tier, *prompt_ids))
    h.update(extra.encode())
    return h.digest()


@dataclass(frozen=True)
class PromptJob:
    """One prompt's request: the Tier-1 window [pool_offset, pool_offset + n_tier1) and up to n_tier2 hinted tries."""

    prompt_id: str
    prompt_ids: tuple[int, ...]
    ground_truth: str
    n_tier1: int
    n_tier2: int = 0
    pool_offset: int = 0
    perturbation: str | None = None  # text appended after the prompt for one Tier-1 slot (§11); None = off
    perturb_slot: int = 0  # window-relative index of that slot

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"prompt {self.prompt_id!r}: prompt_ids must not be empty")
        if self.n_tier1 < 1:
            raise ValueError(f"prompt {self.prompt_id!r}: n_tier1 must be >= 1, got {self.n_tier1}")
        if self.n_tier2 < 0:
            raise ValueError(f"prompt {self.prompt_id!r}: n_tier2 must be >= 0, got {self.n_tier2}")
        if self.pool_offset < 0:
            raise ValueError(f"prompt {self.prompt_id!r}: pool_offset must be >= 0, got {self.pool_offset}")
        if self.n_tier2 and not self.ground_truth.strip():
            raise ValueError(f"prompt {self.prompt_id!r}: ground_truth is required when n_tier2 > 0 (the hint holds it)")
        if self.perturbation is not None and not 0 <= self.perturb_slot < self.n_tier1:
            raise ValueError(f"prompt {self.prompt_id!r}: perturb_slot must be in 0..{self.n_tier1 - 1}, got {self.perturb_slot}")


@dataclass(frozen=True)
class Draw:
    """Pool entries ``indices`` of one prompt's tier to sample, with their seeds (one engine request)."""

    job: PromptJob
    tier: int
    indices: tuple[int, ...]
    seeds: tuple[int, ...]
    perturbed: bool = False  # a Tier-1 slot sampled after the perturbed prompt

    def __post_init__(self) -> None:
        if len(self.indices) != len(self.seeds):
            raise ValueError(f"seeds: expected {len(self.indices)} (one per index), got {len(self.seeds)}")
        if self.tier not in (TIER1, TIER2):
            raise ValueError(f"tier: must be {TIER1} or {TIER2}, got {self.tier}")


@dataclass
class CandidateRecord:
    """One sample with everything the trainer and the cache need; ``topk`` is None for samples not kept."""

    tier: int
    index: int
    token_ids: tuple[int, ...]
    finish_reason: str
    text: str
    answer: str | None
    correct: bool
    leaked: bool = False
    perturbed: bool = False
    topk: TopK | None = None


@dataclass
class PromptResult:
    prompt_id: str
    candidates: list[CandidateRecord]  # the Tier-1 window, then the kept Tier-2 samples
    tier2_attempts: list[CandidateRecord] = field(default_factory=list)  # every hinted sample, kept or not
    seconds: float = 0.0

    @property
    def tier2_drawn(self) -> int:
        return len(self.tier2_attempts)

    @property
    def tier2_leaked(self) -> int:
        return sum(c.leaked for c in self.tier2_attempts)


class CandidatePipeline:
    """Runs batches of ``PromptJob`` through an engine, the verifier and a scorer."""

    def __init__(
        self,
        engine: GenerationEngine,
        scorer: Scorer,
        tokenizer,
        sampling: SamplingParams,
        logprob_k: int = 16,
        seed: int = 0,
        verifier: BoundedVerifier | None = None,
        keep_leaked: bool = False,
        seed_fn: Callable[[PromptJob, int, int], int] | None = None,
    ) -> None:
        if logprob_k < 1:
            raise ValueError(f"logprob_k: must be >= 1, got {logprob_k}")
        self.engine, self.scorer, self.tokenizer = engine, scorer, tokenizer
        self.sampling, self.logprob_k, self.seed = sampling, logprob_k, seed
        self.verifier, self.keep_leaked = verifier, keep_leaked
        self.seed_fn = seed_fn or self._default_seed
        self.engine_calls = 0  # generation calls made (the server reports it; tests check batching with it)
        self.score_calls = 0

    def _default_seed(self, job: PromptJob, tier: int, index: int) -> int:
        extra = job.ground_truth if tier == TIER2 else ""  # Tier-2 pools depend on the answer in the hint
        return derive_seed(self.seed, prompt_key(job.prompt_ids, tier, extra), index)

    def _perturbed_ids(self, job: PromptJob) -> tuple[int, ...]:
        """The reference appends the perturbation's ids right after the templated prompt (§11)."""
        extra = self.tokenizer.encode(job.perturbation or "", add_special_tokens=False)
        return tuple(job.prompt_ids) + tuple(extra)

    def sampling_prompt(self, job: PromptJob, tier: int, perturbed: bool = False) -> tuple[int, ...]:
        """The ids a draw samples after: the hinted prompt for Tier 2, the perturbed one for a perturbed draw,
        else the job's own prompt. One place, so the server's length check measures what the engine gets."""
        if tier == TIER2:
            return tuple(hinted_prompt_ids(list(job.prompt_ids), job.ground_truth, self.tokenizer))
        if perturbed:
            return self._perturbed_ids(job)
        return tuple(job.prompt_ids)

    def _records(self, tier: int, indices: Sequence[int], gens, ground_truths: list[str]) -> list[CandidateRecord]:
        texts = [self.tokenizer.decode(list(g.token_ids), skip_special_tokens=True) for g in gens]
        correct = is_correct_batch(texts, ground_truths, self.verifier) if texts else []
        return [
            CandidateRecord(
                tier=tier,
                index=i,
                token_ids=tuple(g.token_ids),
                finish_reason=g.finish_reason,
                text=text,
                answer=extract_boxed(text),
                correct=ok,
                leaked=leaks(text) if tier == TIER2 else False,
            )
            for i, g, text, ok in zip(indices, gens, texts, correct)
        ]

    def seeds(self, job: PromptJob, tier: int, indices: Sequence[int]) -> tuple[int, ...]:
        return tuple(self.seed_fn(job, tier, i) for i in indices)

    def draw(self, draws: Sequence[Draw], sampling: SamplingParams | None = None) -> list[list[CandidateRecord]]:
        """Sample every draw in ONE engine call; records judged against each job's ground truth.

        A building block for ``run`` and for the cache, which decides itself which pool entries are missing and
        which seeds they take. A Tier-2 draw samples after the hinted prompt, a perturbed one after the
        perturbed prompt; neither is ever a scoring context (see ``score``).
        """
        requests = []
        for d in draws:
            prompt = self.sampling_prompt(d.job, d.tier, d.perturbed)
            requests.append(GenerationRequest(prompt, tuple(d.seeds)))
        outputs = self.engine.generate(requests, sampling or self.sampling) if requests else []
        self.engine_calls += bool(requests)
        by_draw = []
        for d, gens in zip(draws, outputs):
            records = self._records(d.tier, list(d.indices), gens, [d.job.ground_truth] * len(gens))
            for record in records:
                record.perturbed = d.perturbed
            by_draw.append(records)
        return by_draw

    def score(self, pairs: Sequence[tuple[Sequence[int], CandidateRecord]], k: int | None = None) -> None:
        """Attach the teacher's top-K to each (ORIGINAL prompt ids, record) pair, in one scorer call."""
        items = [ScoreItem(tuple(prompt) + record.token_ids, len(prompt)) for prompt, record in pairs]
        if not items:
            return
        self.score_calls += 1
        for (_, record), output in zip(pairs, self.scorer.score(items, k or self.logprob_k)):
            record.topk = output.topk

    def run(self, jobs: Sequence[PromptJob]) -> list[PromptResult]:
        """All of Tier 1, then Tier 2 for the all-wrong prompts, then scoring; results in job order."""
        start = time.monotonic()
        results = [PromptResult(prompt_id=j.prompt_id, candidates=[]) for j in jobs]
        tier1 = self._tier1(jobs)
        retry = [
            n for n, job in enumerate(jobs) if job.n_tier2 > 0 and not any(c.correct for c in tier1[n])
        ]
        tier2 = self._tier2([jobs[n] for n in retry])
        for n, records in enumerate(tier1):
            results[n].candidates.extend(records)
        for n, attempts in zip(retry, tier2):
            results[n].tier2_attempts = attempts
            results[n].candidates.extend(c for c in attempts if c.correct and (self.keep_leaked or not c.leaked))
        self._score(jobs, results)
        elapsed = time.monotonic() - start
        for result in results:
            result.seconds = elapsed
        return results

    def _tier1(self, jobs: Sequence[PromptJob]) -> list[list[CandidateRecord]]:
        draws, owners = [], []
        for n, job in enumerate(jobs):
            window = list(range(job.pool_offset, job.pool_offset + job.n_tier1))
            perturbed = job.pool_offset + job.perturb_slot if job.perturbation is not None else None
            plain = [i for i in window if i != perturbed]
            if plain:
                draws.append(Draw(job, TIER1, tuple(plain), self.seeds(job, TIER1, plain)))
                owners.append(n)
            if perturbed is not None:
                draws.append(Draw(job, TIER1, (perturbed,), self.seeds(job, TIER1, [perturbed]), perturbed=True))
                owners.append(n)
        by_job: list[list[CandidateRecord]] = [[] for _ in jobs]
        for n, records in zip(owners, self.draw(draws)):
            by_job[n].extend(records)
        for records in by_job:
            records.sort(key=lambda r: r.index)
        return by_job

    def _tier2(self, jobs: Sequence[PromptJob]) -> list[list[CandidateRecord]]:
        indices = [tuple(range(job.n_tier2)) for job in jobs]
        return self.draw([Draw(job, TIER2, idx, self.seeds(job, TIER2, idx)) for job, idx in zip(jobs, indices)])

    def _score(self, jobs: Sequence[PromptJob], results: list[PromptResult]) -> None:
        # the ORIGINAL prompt: never the hinted or perturbed one the sample was drawn from
        self.score([(job.prompt_ids, record) for job, result in zip(jobs, results) for record in result.candidates])
