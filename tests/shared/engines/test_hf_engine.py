"""HFEngine: the EOS convention, finish reasons, seeds that survive any batching, exact greedy, strict inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from brts.shared.engines.base import GenerationEngine, GenerationRequest, SamplingParams
from brts.shared.engines.hf import HFEngine

NO_EOS = (999,)  # an id the tiny random model practically never emits at these lengths (checked in the tests)


def argmax_decode(model: Any, prompt: tuple[int, ...], steps: int) -> list[int]:
    """Greedy decoding without cache or padding: the reference for temperature 0."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_protocol_and_properties(tiny_qwen2: Any) -> None:
    engine = HFEngine(tiny_qwen2, eos_token_ids=(5, 7))
    assert isinstance(engine, GenerationEngine)
    assert (engine.name, engine.vocab_size, engine.max_context, engine.eos_token_ids) == ("hf", 1000, 512, (5, 7))
    scorer = engine.scorer()
    assert scorer is engine.scorer() and scorer.model is engine.model  # one model, no second copy
    assert scorer.vocab_size == 1000 and scorer.max_context == 512
    with pytest.raises(ValueError, match="eos_token_ids"):
        HFEngine(tiny_qwen2)  # a random model has no EOS in its generation config and no tokenizer


def test_greedy_equals_argmax_decoding_with_left_padding(tiny_qwen2: Any) -> None:
    engine = HFEngine(tiny_qwen2, eos_token_ids=NO_EOS)
    prompts = [(11, 12, 13), tuple(range(40, 61)), (7,), tuple(range(100, 109))]
    gens = engine.generate(
        [GenerationRequest(p, (0, 1)) for p in prompts], SamplingParams(temperature=0.0, max_new_tokens=10)
    )
    for prompt, per in zip(prompts, gens):
        expected = argmax_decode(tiny_qwen2, prompt, 10)
        assert NO_EOS[0] not in expected
        for g in per:  # seeds do not matter at temperature 0
            assert list(g.token_ids) == expected and g.finish_reason == "length"


def test_eos_ends_a_sample_exactly_once_and_other_rows_go_on(tiny_qwen2: Any) -> None:
    prompts = [(11, 12, 13), tuple(range(40, 61)), (7,)]
    greedy = [argmax_decode(tiny_qwen2, p, 12) for p in prompts]
    eos = greedy[0][4]  # make the first row's 5th greedy token an EOS
    engine = HFEngine(tiny_qwen2, eos_token_ids=(NO_EOS[0], eos))
    gens = engine.generate(
        [GenerationRequest(p, (0,)) for p in prompts], SamplingParams(temperature=0.0, max_new_tokens=12)
    )
    for ref, (g,) in zip(greedy, gens):
        if eos in ref:
            cut = ref.index(eos) + 1
            assert list(g.token_ids) == ref[:cut] and g.finish_reason == "stop"
            assert list(g.token_ids).count(eos) == 1 and g.token_ids[-1] == eos
        else:  # rows that never stop keep decoding correctly after the others left the batch
            assert list(g.token_ids) == ref and g.finish_reason == "length"
    assert len(gens[0][0].token_ids) <= 5


def test_seeds_reproduce_samples_across_batchings(tiny_qwen2: Any) -> None:
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12)
    target = GenerationRequest((21, 22, 23, 24), (5, 6, 5))
    alone = HFEngine(tiny_qwen2, eos_token_ids=NO_EOS).generate([target], sampling)[0]
    others = [GenerationRequest(tuple(range(300, 330)), (1, 2, 3)), GenerationRequest((9,), (6, 8))]
    crowd = HFEngine(tiny_qwen2, eos_token_ids=NO_EOS).generate([others[0], target, others[1]], sampling)[1]
    one_by_one = HFEngine(tiny_qwen2, eos_token_ids=NO_EOS, max_batch_size=1).generate([others[1], target], sampling)[1]
    assert [g.token_ids for g in alone] == [g.token_ids for g in crowd] == [g.token_ids for g in one_by_one]
    assert alone[0].token_ids == alone[2].token_ids  # same seed, same sample
    assert alone[0].token_ids != alone[1].token_ids  # different seeds differ (could fail if seeds were ignored)
    again = HFEngine(tiny_qwen2, eos_token_ids=NO_EOS).generate(
        [target], SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12)
    )
    assert [g.token_ids for g in again[0]] == [g.token_ids for g in alone]


def test_sampling_follows_the_filtered_distribution(tiny_qwen2_factory: Any) -> None:
    model = tiny_qwen2_factory(vocab_size=200, seed=5)
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)  # sharpen: a few likely tokens, so frequencies are testable
        probs = torch.softmax(model(torch.tensor([[3, 4, 5]])).logits[0, -1].double(), -1).numpy()
    engine = HFEngine(model, eos_token_ids=(199,), max_batch_size=512)
    order = np.argsort(-probs)
    n = 3000
    req = [GenerationRequest((3, 4, 5), tuple(range(n)))]

    def draw(**kw: Any) -> np.ndarray:
        gens = engine.generate(req, SamplingParams(max_new_tokens=1, **kw))[0]
        return np.bincount([g.token_ids[0] for g in gens], minlength=200) / n

    for freq, p in ((draw(temperature=1.0, top_p=1.0), probs),
                    (draw(temperature=1.0, top_k=3, top_p=1.0),
                     np.where(np.isin(np.arange(200), order[:3]), probs, 0))):
        p = p / p.sum()
        assert freq[p == 0].sum() == 0
        assert np.abs(freq - p).max() < 4 * np.sqrt(0.25 / n), (freq[order[:5]], p[order[:5]])
    nucleus = order[: int(np.searchsorted(np.cumsum(probs[order]), 0.8) + 1)]
    freq = draw(temperature=1.0, top_p=0.8)
    assert set(np.flatnonzero(freq)) <= set(nucleus.tolist()) and freq[nucleus[0]] > 0
    assert draw(temperature=1e-4)[order[0]] == 1.0 and draw(temperature=1.0, top_k=1)[order[0]] == 1.0


def test_length_finish_reason(tiny_qwen2: Any) -> None:
    engine = HFEngine(tiny_qwen2, eos_token_ids=NO_EOS)
    (per,) = engine.generate(
        [GenerationRequest((1, 2, 3), (0, 1, 2))], SamplingParams(temperature=0.7, max_new_tokens=5)
    )
    assert [(len(g.token_ids), g.finish_reason) for g in per] == [(5, "length")] * 3
    assert engine.generate([GenerationRequest((1, 2), ())], SamplingParams(max_new_tokens=3)) == [[]]
    assert engine.generate([], SamplingParams(max_new_tokens=3)) == []


def test_toy_teacher_stops_with_one_eos(hf_engine: HFEngine, toy_tokenizer: Any) -> None:
    from brts.toy import make_problems, toy_prompt_spec

    spec = toy_prompt_spec(toy_tokenizer)
    prompts = spec.encode_batch([p.problem for p in make_problems(8, seed=3)])
    assert hf_engine.eos_token_ids[0] == toy_tokenizer.convert_tokens_to_ids("<|im_end|>")
    gens = hf_engine.generate([GenerationRequest(tuple(p), (0, 1)) for p in prompts],
                              SamplingParams(temperature=0.7, max_new_tokens=40))
    for per in gens:
        for g in per:
            assert g.finish_reason == "stop" and g.token_ids[-1] in hf_engine.eos_token_ids
            assert sum(t in hf_engine.eos_token_ids for t in g.token_ids) == 1
    cut = hf_engine.generate(
        [GenerationRequest(tuple(prompts[0]), (0,))], SamplingParams(temperature=0.0, max_new_tokens=3)
    )
    assert cut[0][0].finish_reason == "length" and len(cut[0][0].token_ids) == 3
    assert not set(cut[0][0].token_ids) & set(hf_engine.eos_token_ids)


@pytest.mark.parametrize(
    "requests_, sampling, message",
    [
        ([GenerationRequest((1, 2), (0,)), GenerationRequest((), (0,))], SamplingParams(max_new_tokens=4),
         r"requests\[1\]\.prompt_ids: must not be empty"),
        ([GenerationRequest((1, 1000), (0,))], SamplingParams(max_new_tokens=4),
         r"requests\[0\]\.prompt_ids: token id 1000 at position 1 is outside 0\.\.999"),
        ([GenerationRequest((1, 2), (0,)), GenerationRequest(tuple(range(500)), (0,))],
         SamplingParams(max_new_tokens=20),
         r"requests\[1\]\.prompt_ids: 500 prompt tokens \+ max_new_tokens=20 exceed the engine's context of 512"),
        ([GenerationRequest(tuple(range(600)), (0,))], SamplingParams(max_new_tokens=4),
         r"requests\[0\]\.prompt_ids: 600 tokens exceed"),
        ([GenerationRequest((1, 2), (0, -1))], SamplingParams(max_new_tokens=4), r"requests\[0\]\.seeds\[1\]"),
        ([GenerationRequest((1, 2), (0,))], SamplingParams(max_new_tokens=512), r"sampling\.max_new_tokens"),
    ],
)
def test_bad_requests_raise_naming_the_field(
    tiny_qwen2: Any, requests_: list, sampling: SamplingParams, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        HFEngine(tiny_qwen2, eos_token_ids=NO_EOS).generate(requests_, sampling)


def test_bf16_model_generates_reproducibly(tiny_qwen2_factory: Any) -> None:
    engine = HFEngine(tiny_qwen2_factory(dtype=torch.bfloat16, seed=2), eos_token_ids=NO_EOS)
    reqs = [GenerationRequest((4, 5, 6), (1, 2)), GenerationRequest(tuple(range(10, 30)), (3,))]
    sampling = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=6)
    first, second = engine.generate(reqs, sampling), engine.generate(reqs, sampling)
    assert first == second and [len(per) for per in first] == [2, 1]
    assert all(len(g.token_ids) == 6 and all(0 <= t < 1000 for t in g.token_ids) for per in first for g in per)
