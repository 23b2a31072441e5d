"""Evaluation: the metric math on constructed results, the bootstrap against a literal transcription of the
reference's code and the exact expectation, and `brts eval` end to end on the toy teacher (hf, CPU)."""

from __future__ import annotations

import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from brts.trainer.eval_metrics import bootstrap_best_and_majority, majority_vote, score_benchmark

sys.path.insert(0, str(Path(__file__).parent))
from train_env import write_problems  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable


def test_all_right_and_all_wrong():
    right = score_benchmark([["1", "1"], ["2", "2"]], [[True, True], [True, True]])
    assert (
        right.mean, right.pass_at_n, right.majority, right.bootstrap_best, right.bootstrap_majority
    ) == (1, 1, 1, 1, 1)
    wrong = score_benchmark([["1", None], [None, None]], [[False, False], [False, False]])
    assert (
        wrong.mean, wrong.pass_at_n, wrong.majority, wrong.bootstrap_best, wrong.bootstrap_majority
    ) == (0, 0, 0, 0, 0)
    mixed = score_benchmark([["3", "4", "4", "5"]], [[True, False, False, False]])
    assert mixed.mean == 0.25 and mixed.pass_at_n == 1.0 and mixed.majority == 0.0
    assert mixed.as_dict()["mean@4"] == 0.25 and mixed.as_dict()["problems"] == 1


def test_majority_groups_by_equivalence_and_breaks_ties_by_first_appearance():
    assert majority_vote(["7", "8"], [False, True]) is False  # 1-1 tie: the first group wins
    assert majority_vote(["8", "7"], [True, False]) is True
    assert majority_vote(["0.5", "1/2", "3"], [True, True, False], equivalent=lambda a, b: eval(a) == eval(b)) is True
    assert majority_vote(["0.5", "1/2", "3"], [True, True, False]) is True  # raw strings: 1-1-1, first wins
    assert majority_vote([None, None, "2"], [False, False, True]) is False  # the unboxed vote together
    with pytest.raises(ValueError, match="samples"):
        majority_vote([], [])


def _reference_bootstrap(preds, vals, n, seed=42, resamples=1000):
    """verl's bootstrap_metric + calc_maj_val, transcribed (global np.random, re-seeded per call)."""
    data = [{"val": v, "pred": p} for v, p in zip(vals, preds)]

    def maj(sample):
        vote2vals = defaultdict(list)
        for d in sample:
            vote2vals[d["pred"]].append(d["val"])
        counts = {k: len(v) for k, v in vote2vals.items()}
        return vote2vals[max(counts, key=counts.get)][0]

    out = []
    for fn in (lambda s: max(d["val"] for d in s), maj):
        np.random.seed(seed)
        acc = []
        for _ in range(resamples):
            idx = np.random.choice(len(data), size=n, replace=True)
            acc.append(fn([data[i] for i in idx]))
        out.append(float(np.mean(acc)))
    return tuple(out)


@pytest.mark.parametrize("preds, vals", [
    (["1", "2", "2", "3"], [True, False, False, False]),
    (["5", "5", "", "6"], [True, True, False, False]),
    (["a", "b"], [False, True]),
])
def test_bootstrap_equals_the_reference_code_and_the_exact_expectation(preds, vals):
    n = len(preds)
    ours = bootstrap_best_and_majority([p or None for p in preds], vals, n)
    assert ours == pytest.approx(_reference_bootstrap(preds, vals, n), abs=1e-12)
    assert ours == bootstrap_best_and_majority([p or None for p in preds], vals, n)  # reproducible from the seed
    exact_best = exact_maj = 0.0
    tuples = list(itertools.product(range(n), repeat=n))
    for idx in tuples:  # every equally likely resample
        exact_best += max(vals[i] for i in idx)
        sub = [preds[i] for i in idx]
        counts = {p: sub.count(p) for p in dict.fromkeys(sub)}
        exact_maj += vals[idx[sub.index(max(counts, key=counts.get))]]
    # 1,000 resamples: standard error <= 0.016; seed 42 lands 3.4 of them off on the second case (it converges:
    # 0.5939 at 200,000 resamples against the exact 0.59375), so the bound is 4.5 standard errors
    assert ours[0] == pytest.approx(exact_best / len(tuples), abs=0.07)
    assert ours[1] == pytest.approx(exact_maj / len(tuples), abs=0.07)
    other = bootstrap_best_and_majority([p or None for p in preds], vals, n, seed=7)
    assert other != ours or len(set(vals)) == 1


def test_brts_eval_end_to_end_on_the_toy_teacher(toy_teacher_dir, tmp_path):
    from brts.cli import main
    from brts.toy import TOY_CHAT_TEMPLATE

    toy = write_problems(tmp_path / "toy.jsonl", 3, seed=11)
    out = tmp_path / "eval"
    args = ["eval", "--model", str(toy_teacher_dir), "--engine", "hf", "--device", "cpu", "--dtype", "float32",
            "--n", "2", "--limit", "3", "--max-new-tokens", "24", "--dataset", str(toy), "--out", str(out),
            "--chat-template", TOY_CHAT_TEMPLATE, "--instruction-suffix", ""]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["benchmarks"]) == {"aime24", "aime25", "amc23", "toy"}
    for name, b in summary["benchmarks"].items():
        assert b["size"] == 3 and b["n"] == 2 and 0 <= b["mean@2"] <= b["pass@2"] <= 1
    assert summary["benchmarks"]["amc23"]["bundled_size"] == 40 and "83" in summary["note"]
    assert summary["benchmarks"]["toy"]["pass@2"] > 0  # the toy teacher solves some of its own task (at T=0.7)
    assert summary["prompt"]["instruction_suffix"] == ""
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 3 * 2
    assert {"problem_id", "sample", "answer", "correct", "length"} <= set(samples[0])
    assert "mean@2" in r.output and "toy" in r.output
    again = CliRunner().invoke(main, args[:-6] + ["--out", str(tmp_path / "eval2"), "--chat-template",
                                                  TOY_CHAT_TEMPLATE, "--instruction-suffix", ""])
    assert again.exit_code == 0
    assert (tmp_path / "eval2" / "samples.jsonl").read_text() == (out / "samples.jsonl").read_text()  # seeded


def test_brts_eval_bad_values_end_with_one_line(tmp_path):
    from brts.cli import main

    r = CliRunner().invoke(main, ["eval", "--model", str(tmp_path), "--benchmarks", "aime99"])
    assert r.exit_code == 1 and "eval.benchmarks" in r.output and "aime99" in r.output
    r = CliRunner().invoke(main, ["eval", "--model", str(tmp_path), "--n", "0"])
    assert r.exit_code == 1 and "eval.n" in r.output
