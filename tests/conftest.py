"""Shared test fixtures: the bundled Qwen2.5 tokenizer and a default PromptSpec.

The environment is set at import, before any test module imports transformers, so that no test can
reach the network and the tokenizers library does not warn about forking.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402


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
