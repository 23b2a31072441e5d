"""The start-up probe's checks as pure functions: a normalised top-K passes, every way of not being one fails,
and the engine-vs-scorer gap ignores padding (brute force over small arrays)."""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from brts.server.probe import ProbeError, check_distribution, engine_gap, probe_teacher


def _topk(rows: int, vocab: int = 50, k: int = 8, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(rows, vocab)) * 3
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.sort(-logp, axis=-1)[:, :k]


def test_a_real_top_k_passes_and_each_defect_fails():
    good = _topk(5)
    check_distribution(good, "float32")
    check_distribution(_topk(1, vocab=8, k=8), "float32")  # the whole vocabulary: mass exactly 1
    for bad, what in [(np.where(np.arange(8) == 3, np.nan, good), "not finite"),
                      (np.where(np.arange(8) == 0, -np.inf, good), "not finite"),
                      (good + 0.5, "not a normalised"),  # mass e^0.5 > 1
                      (good - good.max() + 0.01, "not a normalised")]:  # a positive log-prob
        with pytest.raises(ProbeError, match=what):
            check_distribution(bad, "bfloat16")


def test_engine_gap_is_the_largest_difference_at_real_ids():
    ids = np.array([[5, 7, -1], [2, -1, -1]])
    engine = np.array([[-0.1, -2.0, -np.inf], [-0.5, -np.inf, -np.inf]])
    scorer = np.array([[-0.1002, -2.03, -np.inf], [-0.5, -np.inf, -np.inf]])
    brute = max(abs(engine[r, c] - scorer[r, c]) for r in range(2) for c in range(3) if ids[r, c] >= 0)
    assert engine_gap(ids, engine, scorer) == pytest.approx(brute) == pytest.approx(0.03)
    assert engine_gap(np.full((2, 2), -1), engine[:, :2], scorer[:, :2]) == 0.0
    assert engine_gap(ids, engine, np.where(ids == 5, np.nan, scorer)) == math.inf


class _StuckEngine:
    """An engine double whose generation never returns until released: the probe's time bound, by construction."""

    name = "stuck"

    def __init__(self) -> None:
        self.release = threading.Event()

    def generate(self, requests, sampling):
        self.release.wait(600)
        raise RuntimeError("released")


def test_a_probe_that_does_not_finish_in_time_fails_naming_the_setting():
    engine = _StuckEngine()
    runtime = SimpleNamespace(engine=engine, config=SimpleNamespace(max_logprob_k=16, model="m"), dtype="float32",
                              tokenizer=SimpleNamespace(encode=lambda text, add_special_tokens: [1, 2, 3]))
    try:
        with pytest.raises(ProbeError, match=r"did not finish within 0.2 s: the stuck engine .* probe_timeout_s"):
            probe_teacher(runtime, timeout_s=0.2)
    finally:
        engine.release.set()
