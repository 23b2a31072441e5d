"""The candidate cache on a real LMDB, with doubles at the engine boundary (``cache_doubles``).

Covers: window semantics (cached prefix, fresh tail, gaps), byte-identical replies, per-request correctness with
conflicting ground truths, Tier-2 attempts stored with their flags and never regenerated, keys (teacher, seed,
ground truth) and collision detection, K slicing and widening, single flight across threads, map growth.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cache_doubles import job, make_pipeline  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

from brts.server.cache import CacheCollisionError, CacheError, CandidateCache  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.server.cache.codec import PoolHeader, encode_pool  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.server.cache.keys import pool_address, sampling_key  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.shared.engines.base import SamplingParams  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

SAMPLING = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=32)
TEACHER = "teacher-aaaa"


@pytest.fixture()
def make_cache(tmp_path, qwen_tokenizer):
    made = []

    def make(teacher=TEACHER, p_right=0.5, gate=None, **kw):
        cache = CandidateCache(tmp_path / "cache", teacher, make_pipeline(qwen_tokenizer, p_right, gate), **kw)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


def _bytes(prompt):
    return [(c.token_ids.tobytes(), c.topk.ids.tobytes(), c.topk.logprobs.tobytes(), c.answer, c.correct)
            for c in prompt.candidates]


def test_window_semantics_cached_prefix_fresh_tail_and_gaps(make_cache, qwen_tokenizer):
    cache = make_cache()
    engine = cache.pipeline.engine
    (first,) = cache.get([job(qwen_tokenizer, 3, 4, n_tier1=2)], SAMPLING, seed=0, k=8)
    assert engine.samples == 2 and [c.index for c in first.candidates] == [0, 1] and not first.cache_hit
    (wider,) = cache.get([job(qwen_tokenizer, 3, 4, n_tier1=4)], SAMPLING, seed=0, k=8)
    assert engine.samples == 4  # only the tail [2, 4) was drawn
    assert [(c.index, c.cached) for c in wider.candidates] == [(0, True), (1, True), (2, False), (3, False)]
    assert _bytes(wider)[:2] == _bytes(first)
    (gap,) = cache.get([job(qwen_tokenizer, 3, 4, n_tier1=2, offset=6)], SAMPLING, seed=0, k=8)
    assert engine.samples == 6 and [c.index for c in gap.candidates] == [6, 7]
    (partial,) = cache.get([job(qwen_tokenizer, 3, 4, n_tier1=8)], SAMPLING, seed=0, k=8, generate=False)
    assert [c.index for c in partial.candidates] == [0, 1, 2, 3, 6, 7] and partial.missing == 2
    assert engine.samples == 6
    # the entries drawn alone are the entries a full window draws: seeds depend on (seed, pool key, index)
    (full,) = CandidateCache(cache.store.path.parent / "other", TEACHER, make_pipeline(qwen_tokenizer)).get(
        [job(qwen_tokenizer, 3, 4, n_tier1=8)], SAMPLING, seed=0, k=8)
    assert [b for b, c in zip(_bytes(full), full.candidates) if c.index in (0, 1, 2, 3, 6, 7)] == _bytes(partial)


def test_replies_are_built_from_the_stored_bytes(make_cache, qwen_tokenizer):
    cache = make_cache()
    jobs = [job(qwen_tokenizer, a, 1, n_tier1=3) for a in range(5)]
    fresh = cache.get(jobs, SAMPLING, seed=0, k=8)
    again = cache.get(jobs, SAMPLING, seed=0, k=8)
    assert [_bytes(p) for p in fresh] == [_bytes(p) for p in again]
    assert all(not c.cached for p in fresh for c in p.candidates) and all(c.cached for p in again for c in p.candidates)
    assert all(p.cache_hit for p in again) and cache.pipeline.engine.calls == 1  # one engine call for the batch
    # float16 storage: the served log-probs are the scorer's, rounded once
    scorer = cache.pipeline.scorer
    expected = scorer.score([scorer.items[0]], 8)[0].topk
    served = fresh[0].candidates[0].topk
    np.testing.assert_array_equal(served.ids, expected.ids)
    np.testing.assert_allclose(served.logprobs.astype(np.float32), expected.logprobs, rtol=1e-3)


def test_correctness_is_judged_per_request_ground_truth(make_cache, qwen_tokenizer):
    cache = make_cache(p_right=1.0)
    (right,) = cache.get([job(qwen_tokenizer, 2, 2, n_tier1=3, truth="4")], SAMPLING, seed=0, k=8)
    (other,) = cache.get([job(qwen_tokenizer, 2, 2, n_tier1=3, truth="5", pid="dup")], SAMPLING, seed=0, k=8)
    assert [c.correct for c in right.candidates] == [True] * 3
    assert [c.correct for c in other.candidates] == [False] * 3  # same pool, same answers, another ground truth
    assert [c.answer for c in right.candidates] == [c.answer for c in other.candidates] == ["4"] * 3
    assert cache.pipeline.engine.samples == 3 and other.cache_hit


def test_tier2_attempts_are_stored_with_flags_and_not_redrawn(make_cache, qwen_tokenizer):
    cache = make_cache()
    hard = job(qwen_tokenizer, 99, 1, n_tier1=2, n_tier2=4)
    easy = job(qwen_tokenizer, 3, 4, n_tier1=2, n_tier2=4, truth="7")
    first = cache.get([hard, easy], SAMPLING, seed=0, k=8)
    drawn = cache.pipeline.engine.samples
    assert first[0].tier2_drawn == 4
    leaked = [c.leaked for c in first[0].tier2_attempts]
    assert any(leaked) and not all(leaked)
    kept = [c for c in first[0].candidates if c.tier == 2]
    assert kept and all(c.correct and not c.leaked and c.topk is not None for c in kept)
    assert len(kept) == leaked.count(False)
    again = cache.get([hard], SAMPLING, seed=0, k=8)
    assert cache.pipeline.engine.samples == drawn
    assert [c.leaked for c in again[0].tier2_attempts] == leaked and again[0].cache_hit
    assert _bytes(again[0]) == _bytes(first[0])
    # a different ground truth is a different Tier-2 pool (the hint holds it): drawn anew, judged by its own truth
    (moved,) = cache.get([job(qwen_tokenizer, 99, 1, n_tier1=2, n_tier2=4, truth="250")], SAMPLING, seed=0, k=8)
    assert cache.pipeline.engine.samples == drawn + 4
    assert {c.answer for c in moved.tier2_attempts} == {"250"}


def test_keys_separate_teachers_seeds_and_settings(make_cache, qwen_tokenizer, tmp_path):
    a = make_cache()
    j = job(qwen_tokenizer, 5, 6, n_tier1=2)
    a.get([j], SAMPLING, seed=0, k=8)
    a.get([j], SAMPLING, seed=1, k=8)
    a.get([j], SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=32), seed=0, k=8)
    assert a.pipeline.engine.samples == 6
    a.close()
    b = make_cache(teacher="teacher-bbbb")  # same directory, another teacher: never served the old entries
    (fresh,) = b.get([j], SAMPLING, seed=0, k=8)
    assert b.pipeline.engine.samples == 2 and not fresh.cache_hit
    addr = pool_address("tier1", "teacher-bbbb", j.prompt_ids, sampling_key(SAMPLING, 0))
    k2 = pool_address("tier2", "teacher-bbbb", j.prompt_ids, sampling_key(SAMPLING, 0), ground_truth="11")
    k3 = pool_address("tier2", "teacher-bbbb", j.prompt_ids, sampling_key(SAMPLING, 0), ground_truth="12")
    assert len({addr.key, k2.key, k3.key}) == 3
    with pytest.raises(ValueError, match="ground_truth"):
        pool_address("tier2", "t", j.prompt_ids, {}, ground_truth=" ")
    # plant another pool's header under this key: a read detects the collision instead of serving it
    other = PoolHeader("tier1", "teacher-bbbb", np.array([1, 2, 3], np.int32), addr.header.sampling)
    b.store.write(lambda txn: txn.put(addr.key, encode_pool(other), db=b.store.db["pools"]))
    with pytest.raises(CacheCollisionError, match="another pool"):
        b.get([j], SAMPLING, seed=0, k=8)


def test_k_is_sliced_and_widened(make_cache, qwen_tokenizer):
    cache = make_cache(store_k=8)
    j = job(qwen_tokenizer, 1, 1, n_tier1=2)
    (k8,) = cache.get([j], SAMPLING, seed=0, k=8)
    (k3,) = cache.get([j], SAMPLING, seed=0, k=3)
    assert cache.rescored == 0
    for wide, narrow in zip(k8.candidates, k3.candidates):
        assert narrow.topk.k == 3
        np.testing.assert_array_equal(narrow.topk.ids, wide.topk.ids[:, :3])
    (k12,) = cache.get([j], SAMPLING, seed=0, k=12)
    assert cache.rescored == 2 and cache.pipeline.engine.samples == 2  # scored again, never drawn again
    assert [c.token_ids.tobytes() for c in k12.candidates] == [c.token_ids.tobytes() for c in k8.candidates]
    (k8again,) = cache.get([j], SAMPLING, seed=0, k=8)
    assert cache.rescored == 2 and _bytes(k8again) == _bytes(k8)  # the widest stored K is kept and sliced
    with pytest.raises(ValueError, match="logprob_k"):
        cache.get([j], SAMPLING, seed=0, k=65)


def _waiting_on_claims(cache) -> int:
    """Threads blocked on another thread's in-flight claim (each waits on the claim's Future, whose Condition
    lists its waiters): the single-flight state made visible, so the test needs no sleep to reach it."""
    with cache._lock:
        return sum(len(future._condition._waiters) for future in cache._inflight.values())


def test_single_flight_across_threads(make_cache, qwen_tokenizer):
    """Four threads ask for one missing pool: the generation is held open (the engine's gate) until the other
    three are waiting on its claim, so the overlap is built, not hoped for on a machine of some speed."""
    gate = threading.Event()
    cache = make_cache(gate=gate)
    jobs = [job(qwen_tokenizer, 7, 8, n_tier1=4)]
    results, errors = [], []

    def ask():
        try:
            results.append(cache.get(jobs, SAMPLING, seed=0, k=8)[0])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 600  # a hang guard only
    while not (cache.pipeline.engine.calls == 1 and _waiting_on_claims(cache) == 3):
        assert time.monotonic() < deadline and not errors, errors
        time.sleep(0.005)
    gate.set()
    for t in threads:
        t.join()
    assert not errors
    assert cache.pipeline.engine.samples == 4 and cache.generated == 4  # four askers, one generation
    assert len({tuple(_bytes(r)) for r in results}) == 1 and sum(not r.cache_hit for r in results) == 1


def test_map_grows_from_a_tiny_map(make_cache, qwen_tokenizer):
    cache = make_cache(map_size=64 << 10)
    jobs = [job(qwen_tokenizer, a, b, n_tier1=4) for a in range(12) for b in range(4)]
    first = cache.get(jobs, SAMPLING, seed=0, k=8)
    assert cache.store.map_size() > 64 << 10
    assert [_bytes(p) for p in cache.get(jobs, SAMPLING, seed=0, k=8)] == [_bytes(p) for p in first]


def test_bad_arguments_name_the_problem(tmp_path, qwen_tokenizer):
    with pytest.raises(ValueError, match="teacher"):
        CandidateCache(tmp_path / "c", "")
    with pytest.raises(ValueError, match="store_k"):
        CandidateCache(tmp_path / "c", TEACHER, store_k=0)
    cache = CandidateCache(tmp_path / "c", TEACHER)
    with pytest.raises(CacheError, match="generate=False"):
        cache.get([job(qwen_tokenizer, 1, 2)], SAMPLING, seed=0, k=4)
    (nothing,) = cache.get([job(qwen_tokenizer, 1, 2)], SAMPLING, seed=0, k=4, generate=False)
    assert nothing.candidates == [] and nothing.missing == 2
    cache.close()
    with pytest.raises(CacheError, match="no cache"):
        CandidateCache(tmp_path / "missing", TEACHER, readonly=True)
