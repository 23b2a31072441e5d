"""HFEngine.generate_with_logprobs: decode-time T=1 top-K on the real tiny Qwen2 (fp32, CPU).

What must hold (issue #21): the same tokens as ``generate`` for the same seeds and sampling; at each generated
position the raw log-softmax of the logits the token was drawn from (before temperature and top-p), which is the
exact scorer's number over (prompt + response) within 1e-4 (measured ~1e-6; a tenth of the probe's fp32 bound,
``ENGINE_TOLERANCE["float32"]``); and this for the
rows still decoding only: a batch where some rows stop early (EOS) and leave the batch must keep every other row's
numbers aligned with its own tokens. ``generate`` must not pay for any of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import brts.shared.engines.hf as hf_mod
from brts.shared.engines.base import (
    ENGINE_TOLERANCE,
    DecodeLogprobs,
    GenerationRequest,
    SamplingParams,
    ScoreItem,
    check_eos_convention,
)
from brts.shared.engines.hf import HFEngine

SAMPLING = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=16)
NO_EOS = 999  # not sampled by the tiny model in these runs (checked below)
PROMPTS = [(11, 12, 13), tuple(range(40, 61)), (7,), tuple(range(100, 109)), tuple(range(200, 240))]
K = 8


def _requests() -> list[GenerationRequest]:
    """Prompts of different lengths (left padding), two seeds each."""
    return [GenerationRequest(p, (i, i + 10)) for i, p in enumerate(PROMPTS)]


def _truncated(tokens: tuple[int, ...], eos: set[int]) -> tuple[tuple[int, ...], str]:
    """What a sample becomes when ``eos`` ends it: up to and including its first EOS."""
    for t, tok in enumerate(tokens):
        if tok in eos:
            return tokens[: t + 1], "stop"
    return tokens, "length"


def test_decode_logprobs_equal_the_exact_scorer_while_rows_finish_early(tiny_qwen2: Any) -> None:
    plain = HFEngine(tiny_qwen2, eos_token_ids=(NO_EOS,)).generate(_requests(), SAMPLING)
    assert all(g.finish_reason == "length" for per in plain for g in per)
    # EOS ids taken from the samples themselves, so that some rows stop early (at different steps) and others
    # run to max_new_tokens; up to its first EOS a row's tokens do not depend on the EOS set
    eos = (NO_EOS, plain[0][0].token_ids[2], plain[3][1].token_ids[6], plain[1][0].token_ids[9])
    engine = HFEngine(tiny_qwen2, eos_token_ids=eos)
    assert isinstance(engine, DecodeLogprobs)
    gens = engine.generate(_requests(), SAMPLING)
    out = engine.generate_with_logprobs(_requests(), SAMPLING, K)
    expected = [[_truncated(g.token_ids, set(eos)) for g in per] for per in plain]
    assert [[(g.token_ids, g.finish_reason) for g in per] for per in gens] == expected
    assert [[s.generation for s in per] for per in out] == gens  # the same tokens as generate, same seeds
    lengths = [len(g.token_ids) for per in gens for g in per]
    assert min(lengths) < 8 and max(lengths) == SAMPLING.max_new_tokens  # early leavers and rows that go on
    scorer, worst, positions = engine.scorer(), 0.0, 0
    for req, per in zip(_requests(), out):
        for s in per:
            toks = s.generation.token_ids
            check_eos_convention(toks, s.generation.finish_reason, eos, "sample")
            assert s.topk.ids.shape == (len(toks), K) and s.token_logprobs.shape == (len(toks),)
            assert s.token_logprobs.dtype == np.float32 and s.topk.logprobs.dtype == np.float32
            # the scorer's log-probs at the sampled token and at the engine's own top-K ids, and its own top-K
            cand = np.concatenate([np.asarray(toks, np.int64)[:, None], s.topk.ids.astype(np.int64)], axis=1)
            (ref,) = scorer.score([ScoreItem(req.prompt_ids + toks, len(req.prompt_ids), cand)], K)
            worst = max(worst, float(np.abs(ref.candidate_logprobs[:, 0] - s.token_logprobs).max()),
                        float(np.abs(ref.candidate_logprobs[:, 1:] - s.topk.logprobs).max()),
                        float(np.abs(ref.topk.logprobs - s.topk.logprobs).max()))
            positions += len(toks)
    print(f"max |hf decode - exact scorer| over {positions} positions, k={K}: {worst:.3g}")  # shown with -s
    assert worst <= 1e-4 < ENGINE_TOLERANCE["float32"], worst


def test_generate_computes_no_logprobs(tiny_qwen2: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Student rollouts and ``brts eval`` call ``generate``: no full-vocabulary log-softmax and top-k per step."""
    calls: list[int] = []
    original = hf_mod._StepLogprobs.record

    def counting(self: Any, logits: torch.Tensor, active: list[int], sampled: torch.Tensor) -> None:
        calls.append(len(active))
        original(self, logits, active, sampled)

    monkeypatch.setattr(hf_mod._StepLogprobs, "record", counting)
    engine = HFEngine(tiny_qwen2, eos_token_ids=(NO_EOS,))
    sampling = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=4)
    engine.generate(_requests(), sampling)
    assert calls == []
    engine.generate_with_logprobs(_requests(), sampling, 2)
    assert calls == [10, 10, 10, 10]  # one record per step, over the active rows


def test_k_is_validated_and_k_equal_to_the_vocabulary_covers_it(tiny_qwen2: Any) -> None:
    engine = HFEngine(tiny_qwen2, eos_token_ids=(NO_EOS,))
    req = [GenerationRequest((1, 2, 3), (0,))]
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=3)
    for k in (0, 1001, True, 2.5, "3", None):
        with pytest.raises(ValueError, match=r"^k: must be an integer in 1\.\.1000 \(the vocabulary\)"):
            engine.generate_with_logprobs(req, sampling, k)  # type: ignore[arg-type]
    (s,) = engine.generate_with_logprobs(req, sampling, np.int64(1000))[0]
    assert s.topk.ids.shape == (3, 1000) and (s.topk.ids >= 0).all()  # every entry real: no padding needed
    np.testing.assert_allclose(np.exp(s.topk.logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    assert all(set(row.tolist()) == set(range(1000)) for row in s.topk.ids)


def test_samples_and_numbers_across_batchings_on_cpu(tiny_qwen2: Any) -> None:
    """``deterministic`` on CPU: a sample's tokens and top-K ids are the same alone, in a left-padded batch and
    one row at a time; its log-probs move by float rounding only (printed with -s)."""
    engine = HFEngine(tiny_qwen2, eos_token_ids=(NO_EOS,))
    assert engine.deterministic is True
    target = GenerationRequest((21, 22, 23, 24), (5, 6))
    alone = engine.generate_with_logprobs([target], SAMPLING, K)[0]
    crowd = engine.generate_with_logprobs([_requests()[4], target, _requests()[2]], SAMPLING, K)[1]
    single = HFEngine(tiny_qwen2, eos_token_ids=(NO_EOS,), max_batch_size=1).generate_with_logprobs(
        [target], SAMPLING, K)[0]
    worst = 0.0
    for a, b, c in zip(alone, crowd, single):
        assert a.generation == b.generation == c.generation
        np.testing.assert_array_equal(a.topk.ids, b.topk.ids)
        np.testing.assert_array_equal(a.topk.ids, c.topk.ids)
        for other in (b, c):
            worst = max(worst, float(np.abs(a.topk.logprobs - other.topk.logprobs).max()),
                        float(np.abs(a.token_logprobs - other.token_logprobs).max()))
    print(f"max |alone - batched| hf decode log-prob on CPU fp32: {worst:.3g}")  # shown with -s
    assert worst <= 1e-5


def test_minus_infinity_logits_become_padding() -> None:
    """A row with fewer than k finite log-probs (a model that masks ids with -inf logits) is padded -1/-inf."""
    rec = hf_mod._StepLogprobs(4)
    logits = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf"), float("-inf")], [0.5, 0.1, 0.2, 0.3, 0.4]])
    rec.record(logits, [0, 1], torch.tensor([2, 0]))
    rec.record(logits[1:], [1], torch.tensor([4]))
    (c0, t0), (c1, t1) = rec.result([1, 2])
    assert t0.ids.tolist() == [[2, 0, -1, -1]] and np.isneginf(t0.logprobs[0, 2:]).all()
    assert t1.ids.tolist() == [[0, 4, 3, 2], [0, 4, 3, 2]]
    lp0 = torch.log_softmax(logits[0], -1)
    np.testing.assert_allclose(c0, [float(lp0[2])], rtol=0, atol=1e-7)
    np.testing.assert_allclose(c1, torch.log_softmax(logits[1], -1)[[0, 4]].numpy(), rtol=0, atol=1e-7)


def test_empty_batch_and_seedless_request(tiny_qwen2: Any) -> None:
    engine = HFEngine(tiny_qwen2, eos_token_ids=(NO_EOS,))
    assert engine.generate_with_logprobs([], SAMPLING, 2) == []
    assert engine.generate_with_logprobs([GenerationRequest((1, 2), ())], SAMPLING, 2) == [[]]
    with pytest.raises(ValueError, match=r"requests\[0\]\.prompt_ids: must not be empty"):
        engine.generate_with_logprobs([GenerationRequest((), (1,))], SAMPLING, 2)
