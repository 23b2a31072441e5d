"""Fixtures for the server tests: tiny random Qwen2 models, the toy teacher's tokenizer, an hf engine.

The fitted toy teacher itself (``toy_teacher_dir``) is in tests/conftest.py, shared with the trainer and
reliability tests: it is fitted once and kept in pytest's cache folder (``.pytest_cache/d/toy-teacher``), so only
the first session pays its ~1 minute fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest


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
    from brts.server.engines.hf import HFEngine

    engine = HFEngine.from_pretrained(toy_teacher_dir, device="cpu", dtype="float32")
    yield engine
    engine.close()
