"""The candidate pipeline: the tier rules, and the engine, verifier and scorer calls the cache makes with them.

The rules of which candidates a prompt gets live here once, as pure functions (brts-reference §3-§5, §11, §14):
which pool entries a Tier-1 window wants and which slot is perturbed (``tier1_slots``), when Tier 2 fires
(``tier2_fires``) and which entries it wants (``tier2_indices``), which fresh samples are judged and scored when
drawn (``judged_when_drawn``, ``scored_when_drawn``), which Tier-2 attempts are kept (``tier2_kept``), which
stored entries must be drawn or scored again wider (``entry_work``), and each entry's seed (``pool_sample_seed``).
The LMDB cache (``brts.server.cache``) only reads, claims and commits, and asks these functions what to do.

``CandidatePipeline`` samples and scores in batches: one engine call for every draw of a batch, one scorer call
for every kept candidate, so a serving engine sees the whole batch at once (the reference generates per student
row, with HF ``generate``, every step: §10).

Where the top-K comes from (``logprob_mode``, the server's ``teacher_logprobs`` once the start-up probe resolved
it): in ``scorer`` mode every kept candidate is re-read by the exact scorer, a second full forward of the teacher.
In ``engine`` mode the engine's own numbers are used (engine-apis §4): a Tier-1 sample drawn after the original
prompt keeps the raw T=1 top-K the engine computed while sampling it (``SOURCE_DECODE``: no second forward); a
sample drawn after another prompt (Tier 2, perturbed) and a wider re-score of a stored entry go through the
engine's prefill over (original prompt + response) (``SOURCE_PREFILL``), or, for an engine without one (hf),
through the exact scorer on the same weights (``SOURCE_SCORER``). Each record carries its source; the cache
stores it with the entry.

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
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

from brts.shared.answers import extract_boxed
from brts.shared.engines.base import (
    SOURCE_DECODE,
    SOURCE_PREFILL,
    SOURCE_SCORER,
    DecodeLogprobs,
    GenerationEngine,
    GenerationRequest,
    PrefillTopK,
    SamplingParams,
    ScoreItem,
    ScoreOutput,
    Scorer,
)
from brts.shared.hints import AFTER_TEMPLATE, PERTURB_POSITIONS, hinted_prompt_ids, leaks, perturbed_prompt_ids
from brts.shared.topk import TopK
from brts.shared.verify import BoundedVerifier

TIER1, TIER2 = 1, 2
DEFAULT_PERTURBATION = "Please reason step by step and rethink in detail before giving the final answer."
DRAW, RESCORE = "draw", "rescore"
EntryWork = Literal["draw", "rescore"]
ENGINE, SCORER = "engine", "scorer"
LogprobMode = Literal["engine", "scorer"]


def pool_sample_seed(seed: int, pool_key: bytes | str, index: int) -> int:
    """Seed of sample ``index`` of a pool: a hash of (seed, pool key, index), so a pool grows append-only and
    sample i is the same draw whoever asks for it and in whatever batch (design.md §4)."""
    key = pool_key.encode() if isinstance(pool_key, str) else pool_key
    digest = hashlib.blake2b(struct.pack("<qq", seed, index) + key, digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF  # engines take non-negative 31-bit seeds


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
    keep_leaked: bool = False  # keep correct Tier-2 samples the leak filter flags (the paper's counting)
    perturb_position: str = AFTER_TEMPLATE  # shared/hints.py PERTURB_POSITIONS

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
            raise ValueError(
                f"prompt {self.prompt_id!r}: ground_truth is required when n_tier2 > 0 (the hint holds it)"
            )
        if self.perturb_position not in PERTURB_POSITIONS:
            raise ValueError(f"prompt {self.prompt_id!r}: perturb_position must be one of "
                             f"{', '.join(PERTURB_POSITIONS)}, got {self.perturb_position!r}")
        if self.perturbation is not None and not 0 <= self.perturb_slot < self.n_tier1:
            raise ValueError(
                f"prompt {self.prompt_id!r}: perturb_slot must be in 0..{self.n_tier1 - 1}, got {self.perturb_slot}"
            )


# -- the tier rules (pure) ---------------------------------------------------------------------------------------
def perturbed_index(job: PromptJob) -> int | None:
    """The pool index of the window's perturbed slot, or None when the job has no perturbation. It is counted
    from the window's start, so a window moved along the pool moves its perturbed slot with it (§11)."""
    return job.pool_offset + job.perturb_slot if job.perturbation is not None else None


def tier1_slots(job: PromptJob) -> list[tuple[int, bool]]:
    """(pool index, perturbed) of every Tier-1 slot, in window order: the order replies list them in."""
    perturbed = perturbed_index(job)
    return [(i, i == perturbed) for i in range(job.pool_offset, job.pool_offset + job.n_tier1)]


def tier2_indices(job: PromptJob) -> range:
    """The Tier-2 attempts a job wants: entries 0..n_tier2-1 of its hinted pool. Not offset by the window: the
    hinted pool is keyed by the ground truth, and every window of the prompt retries with the same attempts."""
    return range(job.n_tier2)


def tier2_fires(job: PromptJob, tier1_correct: Iterable[bool]) -> bool:
    """Tier 2 runs for a prompt iff it asks for attempts and none of its served Tier-1 candidates is correct
    (judged against this request's ground truth); a prompt with a correct sample needs no rescue."""
    return job.n_tier2 > 0 and not any(tier1_correct)


def judged_when_drawn(tier: int) -> bool:
    """Is a fresh sample's verdict needed before it is stored? Only a Tier-2 attempt's, to decide whether it is
    scored (``scored_when_drawn``). A Tier-1 sample is judged when served, against each request's ground truth:
    a Tier-1 pool is shared by every ground truth, so a verdict at draw time would be one request's only."""
    return tier == TIER2


def scored_when_drawn(tier: int, correct: bool | None) -> bool:
    """Is a fresh sample scored (given a top-K) before it is stored? ``correct``: its verdict, None when not
    judged (``judged_when_drawn``). Every Tier-1 sample is, since any request may keep it. A Tier-2 attempt is
    scored only when it can be kept: when correct, a verdict that never changes because its pool's ground truth
    is fixed. A correct attempt that leaked is scored too: ``keep_leaked`` is a server setting, and a server
    that keeps leaks may serve it from the same cache."""
    return tier == TIER1 or bool(correct)


def tier2_kept(correct: bool, leaked: bool, scored: bool, keep_leaked: bool) -> bool:
    """Does a Tier-2 attempt join the prompt's candidates? Iff it is correct, has not leaked the key (unless the
    server keeps leaks), and has a top-K to distil from (an attempt stored unscored never gains one)."""
    return correct and (keep_leaked or not leaked) and scored


def decode_topk_kept(mode: str, tier: int, perturbed: bool) -> bool:
    """Does a fresh sample keep the top-K the engine computed while sampling it? Only in engine mode and only when
    it was sampled after the ORIGINAL prompt (a Tier-1, unperturbed draw): the numbers a Tier-2 or perturbed draw
    comes with are conditioned on the hinted or perturbed prompt, never a distillation target (§4.4, §11)."""
    return mode == ENGINE and tier == TIER1 and not perturbed


def entry_work(stored: bool, stored_k: int | None, k: int) -> EntryWork | None:
    """What a wanted pool entry needs before it is served with a top-K of width ``k``: ``DRAW`` when it does not
    exist, ``RESCORE`` when its stored top-K is narrower than asked (scored again wider, never drawn again), else
    None. ``stored_k`` is None for an entry stored without a top-K (an unkept Tier-2 attempt): it stays so."""
    if not stored:
        return DRAW
    if stored_k is not None and stored_k < k:
        return RESCORE
    return None


@dataclass(frozen=True)
class PoolDraw:
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
    """One sample as drawn, before it is stored: no verdict (correctness is judged against each request's ground
    truth, from the stored answer); ``topk`` is None until scored, and stays None for samples never scored."""

    tier: int
    index: int
    token_ids: tuple[int, ...]
    finish_reason: str
    text: str
    answer: str | None
    leaked: bool = False
    perturbed: bool = False
    topk: TopK | None = None
    source: str = SOURCE_SCORER  # where ``topk`` came from (engines/base.py LOGPROB_SOURCES)


class CandidatePipeline:
    """The teacher's engine, scorer, tokenizer and verifier, with the batch calls the cache makes on them.

    No seed here: every request brings its own to ``CandidateCache.get``, which derives each entry's
    (``pool_sample_seed``), so one pipeline serves requests with different seeds.
    """

    def __init__(
        self,
        engine: GenerationEngine,
        scorer: Scorer,
        tokenizer,
        sampling: SamplingParams,
        logprob_k: int = 16,
        verifier: BoundedVerifier | None = None,
        keep_leaked: bool = False,
        logprob_mode: LogprobMode = SCORER,
    ) -> None:
        if logprob_k < 1:
            raise ValueError(f"logprob_k: must be >= 1, got {logprob_k}")
        self.engine, self.scorer, self.tokenizer = engine, scorer, tokenizer
        self.sampling, self.logprob_k = sampling, logprob_k
        self.verifier, self.keep_leaked = verifier, keep_leaked
        self.engine_calls = 0  # generation calls made (the server reports it; tests check batching with it)
        self.score_calls = 0  # scoring calls made (exact scorer or engine prefill)
        self.draw_seconds = 0.0  # wall time in engine generation calls (bench_prewarm reads both)
        self.score_seconds = 0.0  # wall time in scoring calls
        self.logprob_mode: LogprobMode = SCORER
        self.set_logprob_mode(logprob_mode)

    def set_logprob_mode(self, mode: str) -> None:
        """Switch where fresh top-Ks come from (the server does it once, before SERVING, from the probe)."""
        if mode not in (ENGINE, SCORER):
            raise ValueError(f"teacher_logprobs: must be {ENGINE!r} or {SCORER!r} once resolved, got {mode!r}")
        if mode == ENGINE and not isinstance(self.engine, DecodeLogprobs):
            raise ValueError(f"teacher_logprobs: the {getattr(self.engine, 'name', '?')} engine returns no "
                             "log-probs while sampling; use scorer")
        self.logprob_mode = mode  # type: ignore[assignment]

    def _prefill(self) -> tuple[Callable[[Sequence[ScoreItem], int], list[ScoreOutput]], str]:
        """What scores a response after its original prompt: the engine's prefill in engine mode when it has one,
        else the exact scorer (for hf, the same weights: its prefill is the scorer)."""
        if self.logprob_mode == ENGINE and isinstance(self.engine, PrefillTopK):
            return self.engine.score_via_prefill, SOURCE_PREFILL
        return self.scorer.score, SOURCE_SCORER

    def _perturbed_ids(self, job: PromptJob) -> tuple[int, ...]:
        """The perturbed prompt at the job's position (``hints.perturbed_prompt_ids``)."""
        return tuple(perturbed_prompt_ids(list(job.prompt_ids), job.perturbation or "", job.perturb_position,
                                          self.tokenizer))

    def sampling_prompt(self, job: PromptJob, tier: int, perturbed: bool = False) -> tuple[int, ...]:
        """The ids a draw samples after: the hinted prompt for Tier 2, the perturbed one for a perturbed draw,
        else the job's own prompt. One place, so the server's length check measures what the engine gets."""
        if tier == TIER2:
            return tuple(hinted_prompt_ids(list(job.prompt_ids), job.ground_truth, self.tokenizer))
        if perturbed:
            return self._perturbed_ids(job)
        return tuple(job.prompt_ids)

    def _records(self, draw: PoolDraw, gens) -> list[CandidateRecord]:  # noqa: ANN001 - engine Generations
        texts = [self.tokenizer.decode(list(g.token_ids), skip_special_tokens=True) for g in gens]
        return [
            CandidateRecord(
                tier=draw.tier,
                index=i,
                token_ids=tuple(g.token_ids),
                finish_reason=g.finish_reason,
                text=text,
                answer=extract_boxed(text),
                leaked=leaks(text) if draw.tier == TIER2 else False,
                perturbed=draw.perturbed,
            )
            for i, g, text in zip(draw.indices, gens, texts)
        ]

    def draw(self, draws: Sequence[PoolDraw], sampling: SamplingParams | None = None,
             k: int | None = None) -> list[list[CandidateRecord]]:
        """Sample every draw in ONE engine call; records carry their answer and leak flag, not a verdict.

        The cache decides which pool entries are missing, which seeds they take and which are judged. A Tier-2
        draw samples after the hinted prompt, a perturbed one after the perturbed prompt; neither is ever a
        scoring context (see ``score``). In engine mode the call also returns the engine's top-K of width ``k``
        (default ``logprob_k``), kept where ``decode_topk_kept`` says so.
        """
        requests = [GenerationRequest(self.sampling_prompt(d.job, d.tier, d.perturbed), tuple(d.seeds)) for d in draws]
        if not requests:
            return []
        sampling, width = sampling or self.sampling, k or self.logprob_k
        start = time.monotonic()
        if self.logprob_mode == ENGINE and any(decode_topk_kept(ENGINE, d.tier, d.perturbed) for d in draws):
            with_topk = self.engine.generate_with_logprobs(requests, sampling, width)  # type: ignore[attr-defined]
            outputs = [[s.generation for s in per] for per in with_topk]
        else:
            with_topk, outputs = None, self.engine.generate(requests, sampling)
        self.draw_seconds += time.monotonic() - start
        self.engine_calls += 1
        records = [self._records(d, gens) for d, gens in zip(draws, outputs)]
        for n, d in enumerate(draws):
            if with_topk is not None and decode_topk_kept(ENGINE, d.tier, d.perturbed):
                for record, sample in zip(records[n], with_topk[n]):
                    record.topk, record.source = sample.topk, SOURCE_DECODE
        return records

    def score(self, pairs: Sequence[tuple[Sequence[int], CandidateRecord]], k: int | None = None) -> None:
        """Attach the teacher's top-K to each (ORIGINAL prompt ids, record) pair that has none of width ``k``
        yet, in one call: the exact scorer, or in engine mode the engine's prefill (``_prefill``)."""
        width = k or self.logprob_k
        todo = [(prompt, record) for prompt, record in pairs if record.topk is None or record.topk.k < width]
        if not todo:
            return
        items = [ScoreItem(tuple(prompt) + record.token_ids, len(prompt)) for prompt, record in todo]
        score, source = self._prefill()
        start = time.monotonic()
        outputs = score(items, width)
        self.score_seconds += time.monotonic() - start
        self.score_calls += 1
        for (_, record), output in zip(todo, outputs):
            record.topk, record.source = output.topk, source
