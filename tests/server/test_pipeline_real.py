"""The candidate pipeline for real: the fitted toy teacher on the hf engine, the real verifier, the real scorer.

Why: the orchestration tests reach every branch with a scripted engine; this one shows that a real teacher
reaches the same three outcomes (Tier-1 correct, Tier-2 rescue, Tier 3 = nothing correct) and that what is
kept carries the teacher's exact top-K after the ORIGINAL prompt. 120 toy problems with 2 Tier-1 samples and
8 hinted tries give about a dozen all-wrong windows, about half of them rescued (~11 s on 2 CPU cores).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from brts.shared.engines.base import SamplingParams
from brts.server.pipeline import TIER1, TIER2, CandidatePipeline, PromptJob
from brts.toy import make_problems, toy_prompt_spec
from brts.shared.answers import extract_boxed, normalize_integer
from brts.shared.hints import hinted_prompt_ids

K = 8


@pytest.fixture(scope="module")
def run(hf_engine: Any, toy_tokenizer: Any) -> tuple[list[PromptJob], list[Any], CandidatePipeline]:
    spec = toy_prompt_spec(toy_tokenizer)
    problems = make_problems(120, seed=11)
    jobs = [PromptJob(p.id, tuple(spec.encode(p.problem)), p.answer, n_tier1=2, n_tier2=8) for p in problems]
    pipe = CandidatePipeline(hf_engine, hf_engine.scorer(), toy_tokenizer,
                             SamplingParams(temperature=1.0, max_new_tokens=20), logprob_k=K, seed=1)
    return jobs, pipe.run(jobs), pipe


def _right(text: str, truth: str) -> bool:
    answer = extract_boxed(text)
    return answer is not None and normalize_integer(answer) == int(truth)


def test_all_three_outcomes_happen_and_follow_the_rules(run: Any, hf_engine: Any) -> None:
    jobs, results, _ = run
    eos = set(hf_engine.eos_token_ids)
    outcomes = {"tier1": 0, "rescued": 0, "tier3": 0}
    for job, result in zip(jobs, results):
        tier1 = [c for c in result.candidates if c.tier == TIER1]
        assert [c.index for c in tier1] == [0, 1]
        for c in tier1 + result.tier2_attempts:
            assert c.correct == _right(c.text, job.ground_truth), c.text  # the verifier agrees with the task
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in eos and not eos & set(c.token_ids[:-1])
        if any(c.correct for c in tier1):
            assert result.tier2_attempts == [] and len(result.candidates) == 2
            outcomes["tier1"] += 1
            continue
        assert len(result.tier2_attempts) == 8  # Tier 2 ran because, and only because, the window was all wrong
        kept = [c for c in result.tier2_attempts if c.correct and not c.leaked]
        assert result.candidates[2:] == kept
        outcomes["rescued" if kept else "tier3"] += 1
    assert min(outcomes.values()) >= 1, outcomes
    assert outcomes["tier1"] > len(jobs) // 2, outcomes


def test_kept_candidates_carry_the_exact_topk_after_the_original_prompt(run: Any, hf_engine: Any,
                                                                      toy_tokenizer: Any) -> None:
    jobs, results, _ = run
    model = hf_engine.model
    rescued = [(j, c) for j, r in zip(jobs, results) for c in r.candidates if c.tier == TIER2]
    assert rescued
    for job, result in zip(jobs, results):
        for c in result.candidates:
            assert c.topk is not None and c.topk.ids.shape == (len(c.token_ids), K)
            assert np.all(np.diff(c.topk.logprobs, axis=1) <= 0)
    for job, cand in rescued[:3] + [(jobs[0], results[0].candidates[0])]:
        def top(prompt: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                logits = model(torch.tensor([list(prompt) + list(cand.token_ids)])).logits[0].float()
            rows = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
            v, i = rows.topk(K, dim=-1)
            return i.numpy(), v.numpy()

        ids, lps = top(job.prompt_ids)
        np.testing.assert_allclose(cand.topk.logprobs, lps, atol=1e-5)
        assert (cand.topk.ids == ids).mean() > 0.99  # ties at the K-th place may swap
        if cand.tier == TIER2:
            hinted = tuple(hinted_prompt_ids(list(job.prompt_ids), job.ground_truth, toy_tokenizer))
            assert np.abs(top(hinted)[1] - cand.topk.logprobs).max() > 1e-3  # the hinted context differs


def test_a_rerun_in_another_batch_draws_the_same_samples(run: Any) -> None:
    jobs, results, pipe = run
    picked = [n for n, r in enumerate(results) if r.tier2_attempts][:3] + [0]
    again = pipe.run([jobs[n] for n in reversed(picked)])
    for n, result in zip(reversed(picked), again):
        first = results[n]
        assert [c.token_ids for c in result.candidates] == [c.token_ids for c in first.candidates]
        assert [c.token_ids for c in result.tier2_attempts] == [c.token_ids for c in first.tier2_attempts]
