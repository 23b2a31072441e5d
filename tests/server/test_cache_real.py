"""The candidate cache for real: the fitted toy teacher on the hf engine, the exact scorer, the real verifier, LMDB.

Why: ``test_cache.py`` covers the cache's orchestration with doubles at the engine boundary; this shows the real
path end to end. 24 toy problems × 4 Tier-1 samples (+ 2 hinted tries for all-wrong windows) at temperature 1.0
are drawn once through ``CandidateCache`` (~10-15 s on 2 CPU cores), then:
(a) a second request is served from LMDB, byte-identical, drawing nothing;
(b) the served float16 top-K equals the exact scorer's top-K after the original prompt, up to float16 rounding;
(c) the stored values of these real candidates take at most 60 B/token at K=16 (the raw arrays take ~100);
(d) another teacher's fingerprint (a copy of the teacher folder with one weight byte changed) sees none of it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from brts.server.cache import CandidateCache, LmdbStore
from brts.server.cache.codec import decode_entry
from brts.server.fingerprint import teacher_fingerprint
from brts.server.pipeline import TIER2, CandidatePipeline, PromptJob
from brts.shared.engines.base import SamplingParams, ScoreItem
from brts.toy import make_problems, toy_prompt_spec

K = 16
N_PROBLEMS, N_TIER1, N_TIER2 = 24, 4, 2
SAMPLING = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=24)
SEED = 7
MAX_BYTES_PER_TOKEN = 60.0


def _bytes(prompt: Any) -> list[tuple]:
    """Everything a reply carries, as bytes: candidates (Tier-1 window + kept Tier-2) and every Tier-2 attempt."""
    def one(c: Any) -> tuple:
        topk = None
        if c.topk is not None:
            topk = (c.topk.ids.tobytes(), c.topk.logprobs.tobytes(), str(c.topk.logprobs.dtype))
        return (c.tier, c.index, c.token_ids.tobytes(), topk, c.answer, c.correct, c.leaked, c.finish_reason)

    return [one(c) for c in prompt.candidates] + [("attempt",) + one(c) for c in prompt.tier2_attempts]


@pytest.fixture(scope="module")
def served(hf_engine: Any, toy_tokenizer: Any, toy_teacher_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    spec = toy_prompt_spec(toy_tokenizer)
    jobs = [PromptJob(p.id, tuple(spec.encode(p.problem)), p.answer, n_tier1=N_TIER1, n_tier2=N_TIER2)
            for p in make_problems(N_PROBLEMS, seed=5)]
    pipe = CandidatePipeline(hf_engine, hf_engine.scorer(), toy_tokenizer, SAMPLING, logprob_k=K)
    teacher = teacher_fingerprint(toy_teacher_dir, toy_tokenizer)
    path = tmp_path_factory.mktemp("cache-real") / "cache"
    # closed before the tests open the directory again: LMDB must not be open twice in one process
    with CandidateCache(path, teacher, pipe, store_k=K, logprob_dtype="float16") as cache:
        first = cache.get(jobs, SAMPLING, seed=SEED, k=K)
        generated = cache.generated
        second = cache.get(jobs, SAMPLING, seed=SEED, k=K)
        counts = {"generated": cache.generated, "rescored": cache.rescored}
    return {"jobs": jobs, "first": first, "second": second, "generated": generated, "after": counts,
            "teacher": teacher, "path": path}


def test_second_reply_is_served_from_lmdb_byte_identical(served: dict[str, Any]) -> None:
    jobs, first, second = served["jobs"], served["first"], served["second"]
    n_all_wrong = sum(not any(c.correct for c in p.candidates if c.tier != TIER2) for p in first)
    expected = N_PROBLEMS * N_TIER1 + N_TIER2 * n_all_wrong
    assert served["generated"] == expected  # every Tier-1 slot, and Tier 2 only for the all-wrong windows
    assert served["after"] == {"generated": expected, "rescored": 0}  # the second reply drew and scored nothing
    assert all(not p.cache_hit for p in first)
    assert all(p.cache_hit and p.missing == 0 for p in second)
    assert all(c.cached for p in second for c in p.candidates + p.tier2_attempts)
    assert [p.prompt_id for p in second] == [j.prompt_id for j in jobs]
    for a, b in zip(first, second):
        assert _bytes(a) == _bytes(b), a.prompt_id
        assert [c.index for c in a.candidates if c.tier != TIER2] == list(range(N_TIER1))
    assert sum(c.correct for p in first for c in p.candidates) > N_PROBLEMS  # the teacher is good, not perfect
    print(f"\n{N_PROBLEMS} prompts: {expected} entries drawn, {n_all_wrong} all-wrong windows went to Tier 2")


def test_served_topk_is_the_exact_scorers_up_to_float16(served: dict[str, Any], hf_engine: Any) -> None:
    jobs, first = served["jobs"], served["first"]
    pairs = [(job, c) for job, p in zip(jobs, first) for c in p.candidates]
    assert all(c.topk is not None for _, c in pairs)
    items = [ScoreItem(tuple(job.prompt_ids) + tuple(int(t) for t in c.token_ids), len(job.prompt_ids))
             for job, c in pairs]
    exact = hf_engine.scorer().score(items, K)  # after the ORIGINAL prompt, also for the kept Tier-2 samples
    compared = 0
    for (job, c), out in zip(pairs, exact):
        assert c.topk.logprobs.dtype == np.float16 and c.topk.ids.shape == (c.token_ids.size, K)
        ref_ids, ref_lps = out.topk.ids, out.topk.logprobs
        np.testing.assert_allclose(c.topk.logprobs.astype(np.float32), ref_lps, rtol=1e-3, atol=1e-6)
        # ids are equal wherever the exact log-prob is unique in its row and above the K-th place's value
        # (the toy teacher's ~151k inactive ids share one logit exactly, so ties are real there)
        tied = (ref_lps[:, :, None] == ref_lps[:, None, :]).sum(-1) > 1
        tied |= ref_lps == ref_lps[:, -1:]
        assert np.array_equal(c.topk.ids[~tied], ref_ids[~tied]), (job.prompt_id, c.tier, c.index)
        for row in range(ref_ids.shape[0]):  # a tie group holds the same ids (before the K-th place's group)
            for value in np.unique(ref_lps[row][tied[row] & (ref_lps[row] != ref_lps[row, -1])]):
                group = ref_lps[row] == value
                assert set(c.topk.ids[row][group]) == set(ref_ids[row][group])
        compared += int((~tied).sum())
    assert compared > 0.5 * sum(c.token_ids.size for _, c in pairs) * K


def test_stored_bytes_per_token_on_real_candidates(served: dict[str, Any]) -> None:
    value_bytes = tokens = scored_bytes = scored_tokens = 0
    with LmdbStore(served["path"], readonly=True) as store, store.read() as txn:
        for _, value in txn.cursor(db=store.db["entries"]):
            entry = decode_entry(value)
            value_bytes += len(value)
            tokens += entry.token_ids.size
            if entry.topk is not None:
                assert entry.k == K
                scored_bytes += len(value)
                scored_tokens += entry.token_ids.size
    assert tokens > 0 and scored_tokens > 0
    per_token, per_scored = value_bytes / tokens, scored_bytes / scored_tokens
    raw = 4 + K * (4 + 2)  # token id + K int32 ids + K float16 log-probs
    print(f"\nstored values: {value_bytes} B for {tokens} tokens = {per_token:.1f} B/token; scored entries only "
          f"{per_scored:.1f} B/token at K={K} (raw arrays {raw} B/token, {raw / per_scored:.2f}x)")
    assert per_scored <= MAX_BYTES_PER_TOKEN


def test_another_teachers_fingerprint_sees_nothing(served: dict[str, Any], toy_teacher_dir: Path,
                                                   toy_tokenizer: Any, tmp_path: Path) -> None:
    other_dir = tmp_path / "other-teacher"
    shutil.copytree(toy_teacher_dir, other_dir)
    assert teacher_fingerprint(other_dir, toy_tokenizer) == served["teacher"]  # a byte-identical copy is the same
    weights = sorted(other_dir.glob("*.safetensors"))
    assert weights
    with weights[0].open("r+b") as f:  # one byte of the last tensor's data: one weight changed
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 0x01]))
    other = teacher_fingerprint(other_dir, toy_tokenizer)
    assert other != served["teacher"]
    jobs = served["jobs"]
    for fingerprint in (other, teacher_fingerprint(toy_teacher_dir, override="other")):
        with CandidateCache(served["path"], fingerprint, None, store_k=K, readonly=True) as cache:
            replies = cache.get(jobs, SAMPLING, seed=SEED, k=K, generate=False)
        assert all(p.candidates == [] and p.tier2_attempts == [] for p in replies)
        # no candidate is correct, so every window also wants its Tier-2 attempts: all missing too
        assert [p.missing for p in replies] == [N_TIER1 + N_TIER2] * N_PROBLEMS
    with CandidateCache(served["path"], served["teacher"], None, store_k=K, readonly=True) as same:
        again = same.get(jobs, SAMPLING, seed=SEED, k=K, generate=False)  # another handle, same teacher: all there
    assert [_bytes(p) for p in again] == [_bytes(p) for p in served["first"]]
