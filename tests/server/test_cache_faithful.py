"""The faithfulness rule of ``brts cache verify --live`` (server/cache/faithful.py ``drift_report``) with each
entry's log-prob source: pure, against a brute-force reading of the rule over small random arrays, and the case
it exists for (an engine's numbers off by less than the engine tolerance pass; the scorer's, off as much, fail)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from brts.server.cache.faithful import SLACK, drift_report
from brts.shared.engines.base import LOGPROB_SOURCES, SOURCE_DECODE, SOURCE_PREFILL, SOURCE_SCORER, source_allowance

DTYPES = ("float32", "bfloat16", "float16", "")


def _brute(stored, ids, live, control, sources, dtype) -> tuple[bool, dict[str, float]]:
    """The rule read literally, one value at a time: drift = |l - s| - half an ulp of s (in s's dtype); every value
    within spread + SLACK + source_allowance(its entry's source, dtype), spread the largest |live - control|."""
    spread = 0.0
    for i, a, b in zip(ids, live, control):
        for (t, k), idx in np.ndenumerate(i):
            if idx >= 0:
                spread = max(spread, abs(float(a[t, k]) - float(b[t, k])))
    ok, worst = True, {}
    for s, i, a, source in zip(stored, ids, live, sources):
        source = source or SOURCE_SCORER
        worst.setdefault(source, 0.0)
        for (t, k), idx in np.ndenumerate(i):
            if idx < 0:
                continue
            half_ulp = float(np.spacing(np.abs(s[t, k]))) / 2
            drift = abs(float(a[t, k]) - float(s[t, k])) - half_ulp
            worst[source] = max(worst[source], drift)
            ok &= drift <= spread + SLACK + source_allowance(source, dtype)
    return ok, worst


def _case(rng: np.random.Generator) -> tuple[list, list, list, list, list, str]:
    """2-3 items of [T<=3, K<=3] log-probs with -1/-inf padding, live moved by a random scale, a random source each."""
    stored, ids, live, control, sources = [], [], [], [], []
    for _ in range(int(rng.integers(2, 4))):
        t, k = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        i = rng.integers(0, 50, size=(t, k)).astype(np.int32)
        i[:, k - 1][rng.random(t) < 0.3] = -1
        s = (-rng.exponential(2.0, size=(t, k))).astype(rng.choice(["float16", "float32"]))
        s[i < 0] = -np.inf
        a = s.astype(np.float64) + rng.choice([1e-6, 2e-5, 3e-4, 5e-3, 0.05, 0.3]) * rng.normal(size=(t, k))
        b = a + rng.choice([0.0, 1e-6, 1e-4]) * rng.normal(size=(t, k))
        a[i < 0] = b[i < 0] = -np.inf
        stored.append(s), ids.append(i), live.append(a.astype(np.float32)), control.append(b.astype(np.float32))
        sources.append(rng.choice([*LOGPROB_SOURCES, ""]))
    return stored, ids, live, control, sources, str(rng.choice(DTYPES))


def test_the_verdict_and_the_drift_per_source_are_the_brute_force_rule() -> None:
    rng = np.random.default_rng(21)
    verdicts, widened = set(), 0
    for _ in range(400):
        stored, ids, live, control, sources, dtype = _case(rng)
        report = drift_report(stored, ids, live, control, sources, dtype)
        ok, worst = _brute(stored, ids, live, control, sources, dtype)
        assert report["faithful"] == ok, (sources, dtype, report)
        assert set(report["by_source"]) == set(worst)
        for source, drift in worst.items():
            row = report["by_source"][source]
            assert row["drift"] == pytest.approx(max(drift, 0.0), abs=1e-12)
            assert row["tolerance"] == pytest.approx(report["spread"] + SLACK + source_allowance(source, dtype))
        verdicts.add(ok)
        # faithful only because of the source: held to the scorer's bound, the same numbers drift
        widened += ok and not drift_report(stored, ids, live, control, None, dtype)["faithful"]
    assert verdicts == {True, False} and widened > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_engine_numbers_pass_within_the_engine_tolerance_and_the_scorers_do_not(dtype: str) -> None:
    ids = [np.array([[3, 9, -1]], dtype=np.int32)]
    stored = [np.array([[-0.5, -2.0, -np.inf]], dtype=np.float32)]
    off = [stored[0] + np.float32(0.05)]  # half the bf16 engine tolerance (0.1), far beyond a control spread of 0
    for source in (SOURCE_DECODE, SOURCE_PREFILL):
        report = drift_report(stored, ids, off, off, [source], dtype)
        assert report["faithful"] and report["by_source"][source]["allowance"] == 0.1
    for source in (SOURCE_SCORER, ""):  # "" (an older server's or entry's) is the scorer
        report = drift_report(stored, ids, off, off, [source], dtype)
        assert not report["faithful"] and report["by_source"][SOURCE_SCORER]["drift"] == pytest.approx(0.05, 1e-5)
    too_far = [stored[0] + np.float32(0.2)]  # a wrong teacher misses by more: engine numbers do not hide it
    assert not drift_report(stored, ids, too_far, too_far, [SOURCE_DECODE], dtype)["faithful"]


def test_a_float32_teacher_gives_engine_numbers_little_room() -> None:
    ids = [np.array([[1, 2]], dtype=np.int32)]
    stored = [np.array([[-1.0, -3.0]], dtype=np.float32)]
    for off, engine_ok in ((5e-5, True), (5e-3, False)):
        live = [stored[0] + np.float32(off)]
        assert drift_report(stored, ids, live, live, [SOURCE_DECODE], "float32")["faithful"] is engine_ok
        assert not drift_report(stored, ids, live, live, [SOURCE_SCORER], "float32")["faithful"]


def test_each_entry_is_held_to_its_own_source_and_the_report_splits_them() -> None:
    ids = [np.array([[1, 2]], dtype=np.int32)] * 3
    stored = [np.array([[-1.0, -3.0]], dtype=np.float32)] * 3
    live = [stored[0] + np.float32(0.05), stored[0], stored[0] + np.float32(0.01)]
    report = drift_report(stored, ids, live, live, [SOURCE_DECODE, SOURCE_SCORER, SOURCE_SCORER], "bfloat16")
    assert list(report["by_source"]) == [SOURCE_SCORER, SOURCE_DECODE]  # LOGPROB_SOURCES order
    scorer, decode = report["by_source"][SOURCE_SCORER], report["by_source"][SOURCE_DECODE]
    assert (scorer["candidates"], decode["candidates"], scorer["positions"], decode["positions"]) == (2, 1, 2, 1)
    assert decode["faithful"] and not scorer["faithful"] and not report["faithful"]
    assert report["drift"] == pytest.approx(0.05, 1e-5) and report["tolerance"] == SLACK
    fixed = [live[0], stored[0], stored[0]]
    assert drift_report(stored, ids, fixed, fixed, [SOURCE_DECODE, SOURCE_SCORER, ""], "bfloat16")["faithful"]


def test_bad_sources_are_refused_by_name() -> None:
    ids, stored = [np.array([[1]], dtype=np.int32)], [np.array([[-1.0]], dtype=np.float32)]
    with pytest.raises(ValueError, match="source"):
        drift_report(stored, ids, stored, stored, ["engine"], "bfloat16")
    with pytest.raises(ValueError, match="sources"):
        drift_report(stored, ids, stored, stored, [SOURCE_SCORER] * 2, "bfloat16")


def test_sources_none_keeps_the_rule_of_before() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        stored, ids, live, control, _, dtype = _case(rng)
        scorer = [SOURCE_SCORER] * len(stored)
        for a, b in itertools.pairwise([drift_report(stored, ids, live, control),
                                        drift_report(stored, ids, live, control, scorer, dtype)]):
            assert (a["faithful"], a["drift"], a["spread"]) == (b["faithful"], b["drift"], b["spread"])
