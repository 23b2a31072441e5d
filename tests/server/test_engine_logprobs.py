"""``teacher_logprobs``: where candidates' top-K come from, with doubles at the engine boundary.

Why: in engine mode the Tier-1 numbers come with the sample (no second forward), and everything sampled after
another prompt (Tier 2, perturbed) or re-scored wider goes through the engine's prefill after the ORIGINAL prompt.
These tests pin those routes exactly (which call gets which items, which source each entry records), and the
pure resolution of ``auto``/``engine``/``scorer`` from what the start-up probe measured. The real engines run the
same contract in ``test_engine_logprobs_real.py``.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cache_doubles import ArithmeticScorer, SeededEngine, job  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

from brts.server.cache import CandidateCache  # noqa: E402 - after the sys.path line
from brts.server.pipeline import (  # noqa: E402 - after the sys.path line
    ENGINE,
    SCORER,
    TIER1,
    TIER2,
    CandidatePipeline,
    decode_topk_kept,
)
from brts.server.probe import ProbeError, probe_teacher, resolve_logprob_mode  # noqa: E402 - after the sys.path line
from brts.shared.engines.base import (  # noqa: E402 - after the sys.path line
    ENGINE_TOLERANCE,
    SOURCE_DECODE,
    SOURCE_PREFILL,
    SOURCE_SCORER,
    SampleLogprobs,
    SamplingParams,
)

K = 8


class NumbersEngine(SeededEngine):
    """``SeededEngine`` that also returns top-K numbers of its own: decode-time ones while sampling and, with
    ``prefill=True``, prefill ones; both ``ArithmeticScorer``'s rule shifted by ``offset`` nats, so a test can
    tell them from the exact scorer's and place them inside or outside a tolerance."""

    def __init__(self, tokenizer: Any, offset: float = 0.0, prefill: bool = True) -> None:
        super().__init__(tokenizer, p_right=0.5)
        self.offset, self.rule = offset, ArithmeticScorer()
        self.decode_calls: list[int] = []  # k of each generate_with_logprobs call
        self.prefill_items: list[Any] = []
        if prefill:
            self.score_via_prefill = self._prefill

    def generate_with_logprobs(self, requests: Sequence[Any], sampling: SamplingParams,
                               k: int) -> list[list[SampleLogprobs]]:
        self.decode_calls.append(k)
        out = []
        for req, gens in zip(requests, self.generate(requests, sampling)):
            items = [SimpleNamespace(token_ids=tuple(req.prompt_ids) + g.token_ids, response_start=len(req.prompt_ids))
                     for g in gens]
            outs = self.rule.score(items, k)
            out.append([SampleLogprobs(g, o.topk.logprobs[:, 0], self._shift(o.topk)) for g, o in zip(gens, outs)])
        return out

    def _prefill(self, items: Sequence[Any], k: int) -> list[Any]:
        self.prefill_items.extend(items)
        return [SimpleNamespace(topk=self._shift(o.topk), candidate_logprobs=None) for o in self.rule.score(items, k)]

    def _shift(self, topk: Any) -> Any:
        return type(topk)(topk.ids, topk.logprobs - np.float32(self.offset))


def _engine_pipeline(tokenizer: Any, prefill: bool = True) -> CandidatePipeline:
    engine = NumbersEngine(tokenizer, offset=0.5, prefill=prefill)
    return CandidatePipeline(engine, ArithmeticScorer(), tokenizer, SamplingParams(), logprob_k=K,
                             logprob_mode=ENGINE)


def test_decode_topk_is_kept_only_for_unperturbed_tier1_draws_in_engine_mode() -> None:
    table = {(mode, tier, perturbed): decode_topk_kept(mode, tier, perturbed)
             for mode, tier, perturbed in itertools.product((ENGINE, SCORER), (TIER1, TIER2), (False, True))}
    assert [key for key, kept in table.items() if kept] == [(ENGINE, TIER1, False)]


@pytest.mark.parametrize("prefill", [True, False])
def test_engine_mode_routes_each_candidate_and_records_its_source(qwen_tokenizer: Any, tmp_path: Path,
                                                                  prefill: bool) -> None:
    """Tier 1 keeps the decode-time numbers (the scorer never sees it); perturbed slots and kept Tier-2 attempts
    are scored after the ORIGINAL prompt by the engine's prefill (or, for an engine without one, the exact
    scorer); one engine call per batch; cached replies are byte-identical and keep their sources."""
    pipe = _engine_pipeline(qwen_tokenizer, prefill)
    engine, scorer = pipe.engine, pipe.scorer
    jobs = [job(qwen_tokenizer, a, 1, n_tier1=3, n_tier2=4, perturbation=" Think again.", perturb_slot=1)
            for a in (2, 99)]  # 99: a hard problem, Tier 1 always wrong, so Tier 2 fires and its attempts are kept
    with CandidateCache(tmp_path / "c", "t", pipe, store_k=K, logprob_dtype="float32") as cache:
        first = cache.get(jobs, SamplingParams(), seed=3, k=K)
        second = cache.get(jobs, SamplingParams(), seed=3, k=K)
    later = SOURCE_PREFILL if prefill else SOURCE_SCORER
    for p, j in zip(first, jobs):
        sources = [(c.tier, c.perturbed, c.source) for c in p.candidates]
        expected_tier1 = [(TIER1, False, SOURCE_DECODE), (TIER1, True, later), (TIER1, False, SOURCE_DECODE)]
        assert sources[:3] == expected_tier1, sources
        assert all(s == (TIER2, False, later) for s in sources[3:])
        for c in p.candidates:  # every number is the rule's after the original prompt (shifted when the engine's)
            item = SimpleNamespace(token_ids=tuple(j.prompt_ids) + tuple(int(t) for t in c.token_ids),
                                   response_start=len(j.prompt_ids))
            (want,) = ArithmeticScorer().score([item], K)
            shift = 0.0 if c.source == SOURCE_SCORER else 0.5
            np.testing.assert_array_equal(c.topk.ids, want.topk.ids)
            np.testing.assert_allclose(c.topk.logprobs, want.topk.logprobs - shift, rtol=0, atol=1e-6)
    assert len(first[1].candidates) > 3  # the hard prompt's attempts were kept
    scored = engine.prefill_items if prefill else scorer.items
    assert sorted(len(i.token_ids) - i.response_start for i in scored) == sorted(
        len(c.token_ids) for p in first for c in p.candidates if c.source != SOURCE_DECODE)
    assert all(tuple(i.token_ids[: i.response_start]) in {j.prompt_ids for j in jobs} for i in scored)
    if prefill:
        assert scorer.items == []  # the exact scorer is out of the candidate path
    assert engine.decode_calls == [K] and engine.calls == 2  # Tier 1 (+ perturbed) in one call, Tier 2 in one
    for a, b in zip(first, second):
        assert [(c.source, c.topk.ids.tobytes(), c.topk.logprobs.tobytes()) for c in a.candidates] == \
               [(c.source, c.topk.ids.tobytes(), c.topk.logprobs.tobytes()) for c in b.candidates]
        assert all(c.cached for c in b.candidates)


def test_a_wider_k_is_rescored_by_the_engine_prefill_and_the_pool_mixes_sources(qwen_tokenizer: Any,
                                                                                tmp_path: Path) -> None:
    """Entries stored at K=4 asked at K=8 are scored again wider through the engine's prefill (never drawn
    again); a window grown later draws its new entries with decode-time numbers: one pool, two sources."""
    pipe = _engine_pipeline(qwen_tokenizer)
    with CandidateCache(tmp_path / "c", "t", pipe, store_k=4, logprob_dtype="float32") as cache:
        cache.get([job(qwen_tokenizer, 3, 4, n_tier1=2)], SamplingParams(), seed=1, k=4)
        assert pipe.engine.prefill_items == [] and cache.rescored == 0
        (wider,) = cache.get([job(qwen_tokenizer, 3, 4, n_tier1=3)], SamplingParams(), seed=1, k=8)
        assert cache.rescored == 2 and cache.generated == 3
    assert [(c.index, c.source, c.topk.k) for c in wider.candidates] == [
        (0, SOURCE_PREFILL, 8), (1, SOURCE_PREFILL, 8), (2, SOURCE_DECODE, 8)]
    assert pipe.engine.decode_calls == [4, 8] and pipe.engine.calls == 2  # the rescore drew nothing


def test_engine_mode_needs_an_engine_with_numbers_of_its_own(qwen_tokenizer: Any) -> None:
    plain = SeededEngine(qwen_tokenizer)
    with pytest.raises(ValueError, match=r"^teacher_logprobs: the seeded engine returns no log-probs while sampling"):
        CandidatePipeline(plain, ArithmeticScorer(), qwen_tokenizer, SamplingParams(), logprob_mode=ENGINE)
    with pytest.raises(ValueError, match=r"^teacher_logprobs: must be 'engine' or 'scorer' once resolved"):
        CandidatePipeline(plain, ArithmeticScorer(), qwen_tokenizer, SamplingParams(), logprob_mode="auto")


def test_resolution_of_teacher_logprobs_from_the_probe() -> None:
    """``scorer`` stays whatever was measured; ``engine`` and ``auto`` take the engine only within the dtype's
    tolerance; outside it (or without numbers) ``auto`` falls back saying why and ``engine`` is one ProbeError."""
    for dtype, bound in ENGINE_TOLERANCE.items():
        for gap in (None, 0.0, bound / 2, bound, bound * 1.5, float("inf"), float("nan")):
            for can_decode in (True, False):
                agrees = can_decode and gap is not None and gap <= bound
                mode, why = resolve_logprob_mode("scorer", "vllm", dtype, can_decode, gap)
                assert (mode, why.startswith("teacher_logprobs=scorer")) == ("scorer", True)
                mode, why = resolve_logprob_mode("auto", "vllm", dtype, can_decode, gap)
                assert mode == ("engine" if agrees else "scorer")
                assert ("fell back" in why) == (not agrees), why
                if agrees:
                    assert resolve_logprob_mode("engine", "vllm", dtype, can_decode, gap)[0] == "engine"
                else:
                    with pytest.raises(ProbeError, match=r"^teacher_logprobs=engine: the vllm engine.*use "
                                                         r"teacher_logprobs=scorer or auto$"):
                        resolve_logprob_mode("engine", "vllm", dtype, can_decode, gap)
    with pytest.raises(ValueError, match="teacher_logprobs: must be one of auto, engine, scorer"):
        resolve_logprob_mode("fast", "hf", "float32", True, 0.0)


class _ScaledEngine:
    """An engine double over the real hf engine whose decode-time numbers are its SAMPLING distribution's
    (log-softmax of logits / T, renormalised), as an external SGLang without SGLANG_RETURN_ORIGINAL_LOGPROB
    returns them: greedy tokens are right (the same model), the numbers are not the raw T=1 ones."""

    name = "scaled"

    def __init__(self, hf: Any) -> None:
        self.hf, self.vocab_size, self.max_context, self.eos_token_ids = hf, hf.vocab_size, hf.max_context, \
            hf.eos_token_ids

    def generate(self, requests: Sequence[Any], sampling: SamplingParams) -> Any:
        return self.hf.generate(requests, sampling)

    def generate_with_logprobs(self, requests: Sequence[Any], sampling: SamplingParams, k: int) -> Any:
        out = self.hf.generate_with_logprobs(requests, sampling, k)
        t = sampling.temperature or 1.0
        return [[SampleLogprobs(s.generation, s.token_logprobs / t,
                                type(s.topk)(s.topk.ids, s.topk.logprobs / np.float32(t)))
                 for s in per] for per in out]


def _runtime(engine: Any, scorer: Any, tokenizer: Any, requested: str) -> Any:
    return SimpleNamespace(engine=engine, scorer=scorer, tokenizer=tokenizer, dtype="float32",
                           default_sampling=SamplingParams(temperature=0.7, top_p=0.95),
                           config=SimpleNamespace(max_logprob_k=16, model="m", teacher_logprobs=requested))


def test_the_probe_takes_the_hf_engine_and_refuses_processed_numbers(hf_engine: Any, toy_tokenizer: Any) -> None:
    """The real hf engine's decode-time top-K agrees with its exact scorer in fp32: ``auto`` serves from the
    engine. An engine returning its sampling distribution instead (T=0.7) is caught: ``auto`` falls back to the
    scorer saying so, an explicit ``engine`` is one line."""
    report = probe_teacher(_runtime(hf_engine, hf_engine.scorer(), toy_tokenizer, "auto"), timeout_s=600)
    print(report.line(), "|", report.mode_line())
    assert report.logprob_mode == "engine" and report.decode_gap is not None and report.decode_gap <= 1e-4
    assert report.prefill_gap is None  # hf's prefill is the exact scorer itself
    scaled = _ScaledEngine(hf_engine)
    report = probe_teacher(_runtime(scaled, hf_engine.scorer(), toy_tokenizer, "auto"), timeout_s=600)
    assert report.logprob_mode == "scorer" and report.decode_gap > ENGINE_TOLERANCE["float32"]
    assert "fell back to the exact scorer: the scaled engine's top-K differs" in report.logprob_reason
    with pytest.raises(ProbeError, match=r"^teacher_logprobs=engine: the scaled engine's top-K differs from the "
                                         r"exact scorer's by .* SGLANG_RETURN_ORIGINAL_LOGPROB=1\); use"):
        probe_teacher(_runtime(scaled, hf_engine.scorer(), toy_tokenizer, "engine"), timeout_s=600)
