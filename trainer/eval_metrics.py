"""Evaluation metrics over n samples per problem: mean@n, pass@n, majority@n, and the reference's bootstraps.

Pure functions, no I/O. Inputs per problem: the n samples' correctness and extracted answers (None = nothing boxed).

* ``mean@n``: fraction correct over all samples (the paper's "Mean").
* ``pass@n``: a problem counts when any of its n samples is correct.
* ``majority@n``: vote over the extracted answers grouped by mathematical equivalence (``equivalent(a, b)``, e.g.
  the bounded math-verify worker), ties to the group seen first; the problem counts when the winning group's first
  sample is correct. Unboxed samples vote together as "no answer".
* ``best@n`` and ``maj@n`` (bootstrap) exactly as the reference computes the paper's "Best" and "Majority"
  (brts-reference §13, verl ``bootstrap_metric``): per problem, ``resamples`` draws of n sample indices WITH
  replacement from ``np.random.RandomState(seed)`` (re-seeded per problem), the max of the correctness (best) and
  the correctness of the first sample whose RAW extracted string is the most frequent (maj, unboxed = ""), each
  averaged over the draws and then over problems. Both use the same draws, as the reference's do.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = ["BenchmarkScores", "bootstrap_best_and_majority", "majority_vote", "score_benchmark"]

Equivalent = Callable[[str, str], bool]


@dataclass(frozen=True)
class BenchmarkScores:
    problems: int
    n: int
    mean: float
    pass_at_n: float
    majority: float
    bootstrap_best: float
    bootstrap_majority: float

    def as_dict(self) -> dict[str, float | int]:
        return {"problems": self.problems, "n": self.n, f"mean@{self.n}": self.mean, f"pass@{self.n}": self.pass_at_n,
                f"majority@{self.n}": self.majority, f"best@{self.n}_bootstrap": self.bootstrap_best,
                f"maj@{self.n}_bootstrap": self.bootstrap_majority}


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool], equivalent: Equivalent | None = None) -> bool:
    """One problem's majority@n: the winning equivalence group's first sample's correctness."""
    if len(answers) != len(correct) or not answers:
        raise ValueError(
            f"answers/correct: need the same, non-zero number of samples, got {len(answers)} and {len(correct)}"
        )
    same = equivalent or (lambda a, b: a == b)
    groups: list[list[int]] = []  # sample indices, groups in order of first appearance
    for i, answer in enumerate(answers):
        for g in groups:
            head = answers[g[0]]
            if (answer is None and head is None) or (answer is not None and head is not None and same(answer, head)):
                g.append(i)
                break
        else:
            groups.append([i])
    best = max(groups, key=len)  # max() keeps the first of equal sizes: ties to first appearance
    return bool(correct[best[0]])


def _raw_majority(preds: Sequence[str], vals: Sequence[bool]) -> bool:
    counts = Counter(preds)  # insertion-ordered: max() below keeps the first-seen of equal counts, like verl
    winner = max(counts, key=counts.__getitem__)
    return bool(vals[list(preds).index(winner)])


def bootstrap_best_and_majority(answers: Sequence[str | None], correct: Sequence[bool], n: int,
                                resamples: int = 1000, seed: int = 42) -> tuple[float, float]:
    """One problem's bootstrap (best@n, maj@n) as the reference computes them."""
    if len(answers) != len(correct) or not answers:
        raise ValueError("answers/correct: need the same, non-zero number of samples")
    if n < 1 or resamples < 1:
        raise ValueError(f"n and resamples: must be >= 1, got {n} and {resamples}")
    rng = np.random.RandomState(seed)
    preds = ["" if a is None else a for a in answers]
    best = maj = 0.0
    for _ in range(resamples):
        idx = rng.choice(len(answers), size=n, replace=True)
        vals = [bool(correct[i]) for i in idx]
        best += max(vals)
        maj += _raw_majority([preds[i] for i in idx], vals)
    return best / resamples, maj / resamples


def score_benchmark(answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]],
                    equivalent: Equivalent | None = None, resamples: int = 1000, seed: int = 42) -> BenchmarkScores:
    """All metrics over problems (one inner sequence of n samples per problem; n equal for all)."""
    if len(answers) != len(correct) or not answers:
        raise ValueError(f"answers/correct: one entry per problem, got {len(answers)} and {len(correct)}")
    n = len(correct[0])
    if any(len(c) != n for c in correct) or any(len(a) != n for a in answers):
        raise ValueError("every problem needs the same number of samples")
    boot = [bootstrap_best_and_majority(a, c, n, resamples, seed) for a, c in zip(answers, correct)]
    p = len(correct)
    return BenchmarkScores(
        problems=p, n=n,
        mean=sum(sum(map(bool, c)) for c in correct) / (p * n),
        pass_at_n=sum(any(c) for c in correct) / p,
        majority=sum(majority_vote(a, c, equivalent) for a, c in zip(answers, correct)) / p,
        bootstrap_best=sum(b for b, _ in boot) / p,
        bootstrap_majority=sum(m for _, m in boot) / p,
    )
