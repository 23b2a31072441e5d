"""Turn wire requests into checked internal ones, or raise ``RequestError`` naming the field and what is allowed.

Why a module of its own: a shared server faces many clients, some buggy, and must answer each bad request
with ``INVALID_ARGUMENT`` and a message a user can act on ("prompts[3].prompt_ids[17]: token id 151936 is
>= vocab_size 151936") while it keeps serving everyone else. Every check runs before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from brts.server.pipeline import TIER1, TIER2, PromptJob
from brts.shared.engines.base import SamplingParams, ScoreItem
from brts.shared.hints import AFTER_TEMPLATE, PERTURB_POSITIONS
from brts.shared.topk import from_proto

# The cache indexes pools by prompt id in an LMDB key (id + NUL + 16-byte pool key), and LMDB keys end at 511 bytes.
MAX_PROMPT_ID_BYTES = 256


class RequestError(ValueError):
    """A request field is invalid; ``str(error)`` names it. ``code`` is the gRPC status name to answer with."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_context: int
    max_logprob_k: int
    max_prompts_per_call: int
    max_samples_per_prompt: int
    max_pool_offset: int
    max_new_tokens: int
    max_score_items: int = 1024


@dataclass(frozen=True)
class CandidatesCall:
    jobs: list[PromptJob]
    sampling: SamplingParams
    seed: int
    k: int
    cache_only: bool
    packed_tokens: bool = False


def _check_ids(ids: Sequence[int], field: str, limits: Limits) -> None:
    if len(ids) == 0:
        raise RequestError(f"{field}: must not be empty")
    arr = np.asarray(ids, dtype=np.int64)
    bad = np.flatnonzero((arr < 0) | (arr >= limits.vocab_size))
    if bad.size:
        i = int(bad[0])
        raise RequestError(f"{field}[{i}]: token id {int(arr[i])} is outside 0..{limits.vocab_size - 1} "
                           f"(vocab_size is the teacher's logits dimension)")


def _k(value: int, limits: Limits, field: str = "logprob_k") -> int:
    if value == 0:
        return limits.max_logprob_k  # unset: the server's maximum
    if not 1 <= value <= limits.max_logprob_k:
        raise RequestError(f"{field}: must be in 1..{limits.max_logprob_k} (this server's max), got {value}")
    return int(value)


def sampling_from(
    message: Any, default: SamplingParams, default_seed: int, limits: Limits
) -> tuple[SamplingParams, int]:
    """Unset fields take the server's defaults (proto3 ``optional``)."""
    t = message.temperature if message.HasField("temperature") else default.temperature
    p = message.top_p if message.HasField("top_p") else default.top_p
    top_k = message.top_k if message.HasField("top_k") else default.top_k
    n = message.max_new_tokens if message.HasField("max_new_tokens") else default.max_new_tokens
    seed = message.seed if message.HasField("seed") else default_seed
    if not np.isfinite(t) or t < 0:
        raise RequestError(f"sampling.temperature: must be >= 0, got {t}")
    if not (0 < p <= 1):
        raise RequestError(f"sampling.top_p: must be in (0, 1], got {p}")
    if top_k != -1 and top_k < 1:
        raise RequestError(f"sampling.top_k: must be -1 (off) or >= 1, got {top_k}")
    if not 1 <= n <= limits.max_new_tokens:
        raise RequestError(f"sampling.max_new_tokens: must be in 1..{limits.max_new_tokens}, got {n}")
    if seed < 0:
        raise RequestError(f"sampling.seed: must be >= 0, got {seed}")
    return SamplingParams(temperature=float(t), top_p=float(p), top_k=int(top_k), max_new_tokens=int(n)), int(seed)


def candidates_call(request: Any, default: SamplingParams, default_seed: int, limits: Limits,
                    teacher: str) -> CandidatesCall:
    if request.expected_teacher and request.expected_teacher != teacher:
        raise RequestError(f"expected_teacher: this server's teacher is {teacher}, not {request.expected_teacher}; "
                           "point the client at the right server or drop expected_teacher", "FAILED_PRECONDITION")
    n = len(request.prompts)
    if not 1 <= n <= limits.max_prompts_per_call:
        raise RequestError(f"prompts: must hold 1..{limits.max_prompts_per_call} prompts, got {n}")
    sampling, seed = sampling_from(request.sampling, default, default_seed, limits)
    k = _k(request.logprob_k, limits)
    jobs = []
    for i, p in enumerate(request.prompts):
        f = f"prompts[{i}]"
        if len(p.prompt_id.encode()) > MAX_PROMPT_ID_BYTES:
            raise RequestError(f"{f}.prompt_id: at most {MAX_PROMPT_ID_BYTES} bytes (UTF-8), got "
                               f"{len(p.prompt_id.encode())}")
        _check_ids(p.prompt_ids, f"{f}.prompt_ids", limits)
        if len(p.prompt_ids) + sampling.max_new_tokens > limits.max_context:
            raise RequestError(f"{f}.prompt_ids: {len(p.prompt_ids)} prompt tokens + max_new_tokens "
                               f"{sampling.max_new_tokens} exceed the teacher's context of {limits.max_context}")
        for name in ("n_tier1", "n_tier2"):
            value = getattr(p, name)
            low = 1 if name == "n_tier1" else 0
            if not low <= value <= limits.max_samples_per_prompt:
                raise RequestError(f"{f}.{name}: must be in {low}..{limits.max_samples_per_prompt}, got {value}")
        if not 0 <= p.pool_offset <= limits.max_pool_offset:
            raise RequestError(f"{f}.pool_offset: must be in 0..{limits.max_pool_offset}, got {p.pool_offset}")
        if p.n_tier2 and not p.ground_truth.strip():
            raise RequestError(f"{f}.ground_truth: required when n_tier2 > 0 (the Tier-2 hint holds it)")
        if p.perturbation and not 0 <= p.perturb_slot < p.n_tier1:
            raise RequestError(f"{f}.perturb_slot: must be in 0..{p.n_tier1 - 1}, got {p.perturb_slot}")
        position = p.perturb_position or AFTER_TEMPLATE
        if position not in PERTURB_POSITIONS:
            raise RequestError(f"{f}.perturb_position: must be one of {', '.join(PERTURB_POSITIONS)} (or empty for "
                               f"{AFTER_TEMPLATE}), got {p.perturb_position!r}")
        jobs.append(PromptJob(p.prompt_id, tuple(int(t) for t in p.prompt_ids), p.ground_truth, p.n_tier1, p.n_tier2,
                              p.pool_offset, p.perturbation or None, p.perturb_slot, bool(p.tier2_keep_leaked),
                              position))
    return CandidatesCall(jobs, sampling, seed, k, bool(request.cache_only), bool(request.packed_tokens))


def check_generation_fits(jobs: Sequence[PromptJob], sampling: SamplingParams, limits: Limits, pipeline: Any) -> None:
    """The prompts the engine samples after besides the request's own -- the Tier-2 hinted prompt (it holds the
    ground truth) and the perturbed one -- must also leave room for max_new_tokens in the teacher's context.

    It needs the tokenizer, so the service runs it only for prompts about to be generated (a cache hit never
    reaches the engine), and before they join a coalesced batch: inside the batch, the engine's error would fail
    every other caller's prompts too. Tier 2 is checked whenever n_tier2 > 0, since whether it is drawn is only
    known after Tier 1."""
    for job in jobs:
        sizes = []
        if job.n_tier2:
            sizes.append(("the Tier-2 hinted prompt", len(pipeline.sampling_prompt(job, TIER2))))
        if job.perturbation is not None:
            sizes.append(("the perturbed prompt", len(pipeline.sampling_prompt(job, TIER1, perturbed=True))))
        for what, n in sizes:
            if n + sampling.max_new_tokens > limits.max_context:
                raise RequestError(f"prompt {job.prompt_id!r}: {what} has {n} tokens, which with max_new_tokens "
                                   f"{sampling.max_new_tokens} exceed the teacher's context of {limits.max_context}")


def score_items(request: Any, limits: Limits) -> tuple[list[ScoreItem], int]:
    n = len(request.items)
    if not 1 <= n <= limits.max_score_items:
        raise RequestError(f"items: must hold 1..{limits.max_score_items} sequences, got {n}")
    k = _k(request.logprob_k, limits)
    items = []
    for i, it in enumerate(request.items):
        f = f"items[{i}]"
        _check_ids(it.token_ids, f"{f}.token_ids", limits)
        length = len(it.token_ids)
        if length > limits.max_context:
            raise RequestError(f"{f}.token_ids: {length} tokens exceed the teacher's context of {limits.max_context}")
        if not 1 <= it.response_start < length:
            raise RequestError(f"{f}.response_start: must be in 1..{length - 1} (a prompt token first, a response "
                               f"token after), got {it.response_start}")
        candidates = None
        if it.HasField("candidate_ids"):
            try:
                candidates = from_proto(it.candidate_ids, f"{f}.candidate_ids")
            except ValueError as exc:
                raise RequestError(str(exc)) from None
            rows = length - it.response_start
            if it.candidate_ids.dtype != "int32" or candidates.ndim != 2 or candidates.shape[0] != rows:
                raise RequestError(f"{f}.candidate_ids: must be int32 [{rows}, K'] (one row per response position), "
                                   f"got {it.candidate_ids.dtype} {list(candidates.shape)}")
            if candidates.size and (candidates.min() < -1 or candidates.max() >= limits.vocab_size):
                raise RequestError(f"{f}.candidate_ids: ids must be in -1..{limits.vocab_size - 1} (-1 = padding)")
        items.append(ScoreItem(tuple(int(t) for t in it.token_ids), int(it.response_start), candidates))
    return items, k
