"""The tier rules for real, as production runs them: ``CandidateCache.get`` on LMDB over the fitted toy teacher
on the hf engine, the real verifier, the real scorer.

Why: the orchestration tests reach every branch with a scripted engine; this one shows that a real teacher
reaches the same three outcomes (Tier-1 correct, Tier-2 rescue, Tier 3 = nothing correct) and that what is
kept carries the teacher's exact top-K after the ORIGINAL prompt (stored as float32 here, so exactness is
checked, not float16 rounding). 120 toy problems with 2 Tier-1 samples and 8 hinted tries give about a dozen
all-wrong windows, about half of them rescued (~11 s on 2 idle CPU cores, as the direct path took).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from brts.server.cache import CandidateCache
from brts.server.pipeline import TIER1, TIER2, CandidatePipeline, PromptJob
from brts.shared.answers import extract_boxed, normalize_integer
from brts.shared.engines.base import SamplingParams
from brts.shared.hints import hinted_prompt_ids
from brts.toy import make_problems, toy_prompt_spec

K = 8
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=20)
SEED = 1


def serve(hf_engine: Any, toy_tokenizer: Any, path: Path, jobs: list[PromptJob]) -> list[Any]:
    """``jobs`` served by a fresh cache in ``path`` (every entry drawn there), closed again before returning."""
    pipe = CandidatePipeline(hf_engine, hf_engine.scorer(), toy_tokenizer, SAMPLING, logprob_k=K)
    with CandidateCache(path, "toy-teacher", pipe, store_k=K, logprob_dtype="float32") as cache:
        return cache.get(jobs, SAMPLING, seed=SEED, k=K)


@pytest.fixture(scope="module")
def run(hf_engine: Any, toy_tokenizer: Any,
        tmp_path_factory: pytest.TempPathFactory) -> tuple[list[PromptJob], list[Any]]:
    spec = toy_prompt_spec(toy_tokenizer)
    problems = make_problems(120, seed=11)
    jobs = [PromptJob(p.id, tuple(spec.encode(p.problem)), p.answer, n_tier1=2, n_tier2=8) for p in problems]
    return jobs, serve(hf_engine, toy_tokenizer, tmp_path_factory.mktemp("pipeline-real") / "cache", jobs)


def _right(text: str, truth: str) -> bool:
    answer = extract_boxed(text)
    return answer is not None and normalize_integer(answer) == int(truth)


def _key(c: Any) -> tuple:
    return (c.tier, c.index, c.token_ids.tobytes())


def test_all_three_outcomes_happen_and_follow_the_rules(run: Any, hf_engine: Any, toy_tokenizer: Any) -> None:
    jobs, results = run
    eos = set(hf_engine.eos_token_ids)
    outcomes = {"tier1": 0, "rescued": 0, "tier3": 0}
    for job, result in zip(jobs, results):
        tier1 = [c for c in result.candidates if c.tier == TIER1]
        assert [c.index for c in tier1] == [0, 1]
        for c in tier1 + result.tier2_attempts:
            text = toy_tokenizer.decode(c.token_ids.tolist(), skip_special_tokens=True)
            assert c.answer == extract_boxed(text)  # the stored answer is the text's last box
            assert c.correct == _right(text, job.ground_truth), text  # the verifier agrees with the task
            if c.finish_reason == "stop":
                assert int(c.token_ids[-1]) in eos and not eos & set(c.token_ids[:-1].tolist())
        if any(c.correct for c in tier1):
            assert result.tier2_attempts == [] and len(result.candidates) == 2
            outcomes["tier1"] += 1
            continue
        assert len(result.tier2_attempts) == 8  # Tier 2 ran because, and only because, the window was all wrong
        kept = [c for c in result.tier2_attempts if c.correct and not c.leaked]
        assert all(c.topk is not None for c in result.tier2_attempts if c.correct)  # a correct attempt is scored
        assert [_key(c) for c in result.candidates[2:]] == [_key(c) for c in kept]
        outcomes["rescued" if kept else "tier3"] += 1
    assert min(outcomes.values()) >= 1, outcomes
    assert outcomes["tier1"] > len(jobs) // 2, outcomes


def test_kept_candidates_carry_the_exact_topk_after_the_original_prompt(run: Any, hf_engine: Any,
                                                                      toy_tokenizer: Any) -> None:
    jobs, results = run
    model = hf_engine.model
    rescued = [(j, c) for j, r in zip(jobs, results) for c in r.candidates if c.tier == TIER2]
    assert rescued
    for job, result in zip(jobs, results):
        for c in result.candidates:
            assert c.topk is not None and c.topk.ids.shape == (c.token_ids.size, K)
            assert np.all(np.diff(c.topk.logprobs, axis=1) <= 0)
    for job, cand in rescued[:3] + [(jobs[0], results[0].candidates[0])]:
        def top(prompt: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                logits = model(torch.tensor([list(prompt) + cand.token_ids.tolist()])).logits[0].float()
            rows = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
            v, i = rows.topk(K, dim=-1)
            return i.numpy(), v.numpy()

        ids, lps = top(job.prompt_ids)
        np.testing.assert_allclose(cand.topk.logprobs, lps, atol=1e-5)
        assert (cand.topk.ids == ids).mean() > 0.99  # ties at the K-th place may swap
        if cand.tier == TIER2:
            hinted = tuple(hinted_prompt_ids(list(job.prompt_ids), job.ground_truth, toy_tokenizer))
            assert np.abs(top(hinted)[1] - cand.topk.logprobs).max() > 1e-3  # the hinted context differs


def test_a_rerun_in_another_batch_draws_the_same_samples(run: Any, hf_engine: Any, toy_tokenizer: Any,
                                                      tmp_path: Path) -> None:
    jobs, results = run
    picked = [n for n, r in enumerate(results) if r.tier2_attempts][:3] + [0]
    again = serve(hf_engine, toy_tokenizer, tmp_path / "again", [jobs[n] for n in reversed(picked)])
    for n, result in zip(reversed(picked), again):
        first = results[n]
        assert not result.cache_hit  # drawn anew in another cache, in another batch: the same samples
        assert [_key(c) for c in result.candidates] == [_key(c) for c in first.candidates]
        assert [_key(c) for c in result.tier2_attempts] == [_key(c) for c in first.tier2_attempts]
