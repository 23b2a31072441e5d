"""The agreement rule (shared/agreement.py) on hand-made scorings, against a brute-force spread; the batches the
probe is scored in; the dtype defaults."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from brts.shared.agreement import AgreementReport, batch_plan, default_tolerance, max_disagreement


def test_max_disagreement_is_the_largest_spread_of_one_value():
    rng = np.random.default_rng(0)
    scorings = [rng.normal(size=(5, 4)) for _ in range(4)]
    brute = max(abs(a[r, c] - b[r, c]) for a, b in itertools.combinations(scorings, 2) for r in range(5)
                for c in range(4))
    assert max_disagreement(scorings) == pytest.approx(brute)
    assert max_disagreement([scorings[0]] * 3) == 0.0
    padded = [np.array([[-0.1, -np.inf]]), np.array([[-0.3, -np.inf]])]  # -inf padding is not a disagreement
    assert max_disagreement(padded) == pytest.approx(0.2)


def test_the_probe_is_scored_alone_and_at_every_place_among_others():
    probe, a, b = [1, 2, 3], [1, 2], [1, 2, 3, 4, 5]
    plan = batch_plan(probe, [a, b])
    places = {(len(batch), next(i for i, s in enumerate(batch) if s is probe)) for batch in plan}
    assert sum(batch == [probe] for batch in plan) == 2
    assert {(2, 0), (2, 1), (3, 1), (3, 2)} <= places


def test_defaults_follow_the_dtype_and_the_verdict_the_tolerance():
    assert default_tolerance("float32") == 1e-4
    assert default_tolerance("bfloat16") == default_tolerance("float16") == default_tolerance("") == 0.1
    assert AgreementReport(7, 16, 2e-3, 1e-2, "bfloat16").ok
    report = AgreementReport(7, 16, 2e-3, 1e-3, "bfloat16")
    assert not report.ok and "2.00e-03 nats" in report.line() and "tolerance 1.0e-03 for bfloat16" in report.line()
