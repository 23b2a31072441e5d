"""The demo's result table, computed from its outputs only (pure: no I/O, no torch).

Why a separate module: the numbers the demo prints are the claim it makes ("BRTS beat OPD by this much, over these
seeds"), so they are computed by small functions that a test can feed by hand: accuracy per seed before training
and after each method, the Tier composition the BRTS runs actually trained on, and the teacher-cache hit rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["Accuracy", "DemoSummary", "accuracy", "format_summary", "final_eval", "summarize", "tier_composition"]


@dataclass(frozen=True)
class Accuracy:
    """One row of the table: the per-seed accuracies, their mean and sample standard deviation (0 for one seed)."""

    label: str
    per_seed: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.per_seed) / len(self.per_seed) if self.per_seed else math.nan

    @property
    def spread(self) -> float:
        n = len(self.per_seed)
        if n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((x - m) ** 2 for x in self.per_seed) / (n - 1))


@dataclass(frozen=True)
class DemoSummary:
    metric: str
    rows: tuple[Accuracy, ...]
    tiers: dict[str, float]
    tier2: dict[str, int]
    train_hit_rate: float
    prewarm: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "accuracy": {
                r.label: {"mean": r.mean, "spread": r.spread, "per_seed": list(r.per_seed)} for r in self.rows
            },
            "tiers": self.tiers, "tier2": self.tier2, "train_cache_hit_rate": self.train_hit_rate,
            "prewarm": self.prewarm, "timings_s": self.timings,
        }


def accuracy(label: str, values: Sequence[float]) -> Accuracy:
    return Accuracy(label, tuple(float(v) for v in values))


def final_eval(records: Sequence[Mapping[str, Any]], metric: str) -> float:
    """The last evaluated value of ``metric`` (``eval/NAME/mean@4``) in a run's metrics lines.

    A run whose final evaluation is missing has not finished; that is an error here, not a silent zero.
    """
    for record in reversed(records):
        if metric in record:
            return float(record[metric])
    raise ValueError(f"{metric}: not in any metrics line (the run has not finished its final evaluation)")


def tier_composition(runs: Sequence[Sequence[Mapping[str, Any]]]) -> tuple[dict[str, float], dict[str, int]]:
    """Share of prompts per tier over every step of ``runs`` (weighted by each step's prompt count), and the
    Tier-2 counts: prompts drawn into Tier 2, rescued by a hinted sample, hinted samples dropped for leaking."""
    weights = {"1": 0.0, "2": 0.0, "3": 0.0, "skip": 0.0}
    total = 0.0
    tier2 = {"drawn": 0, "rescued": 0, "leaked": 0}
    for records in runs:
        for r in records:
            if r.get("tier/1") is None:
                continue
            n = float(r.get("prompts", 1))
            total += n
            for key in weights:
                weights[key] += n * float(r.get(f"tier/{key}", 0.0))
            for key in tier2:
                tier2[key] += int(r.get(f"tier2/{key}", 0))
    return ({k: (v / total if total else math.nan) for k, v in weights.items()}, tier2)


def mean_hit_rate(runs: Sequence[Sequence[Mapping[str, Any]]]) -> float:
    rates = [float(r["cache_hit_rate"]) for records in runs for r in records if r.get("cache_hit_rate") is not None]
    return sum(rates) / len(rates) if rates else math.nan


def summarize(before: Sequence[float], brts_runs: Sequence[Sequence[Mapping[str, Any]]],
              opd_runs: Sequence[Sequence[Mapping[str, Any]]], metric: str, prewarm: Mapping[str, Any] | None = None,
              timings: Mapping[str, float] | None = None) -> DemoSummary:
    """The table's content: before / after OPD / after BRTS accuracies (one value per seed each), the BRTS runs'
    Tier composition and the training-time cache hit rate (OPD has no teacher branch, so no candidates)."""
    tiers, tier2 = tier_composition(brts_runs)
    rows = (accuracy("before (untrained student)", before),
            accuracy("after OPD (student-only)", [final_eval(r, metric) for r in opd_runs]),
            accuracy("after BRTS", [final_eval(r, metric) for r in brts_runs]))
    return DemoSummary(metric, rows, tiers, tier2, mean_hit_rate(brts_runs), dict(prewarm or {}), dict(timings or {}))


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.0%}"


def format_summary(s: DemoSummary) -> str:
    """The printed table (Markdown, so the same text goes into ``summary.md``)."""
    head = f"{s.metric} (mean ± sd over seeds)"
    cells = [(r.label, f"{r.mean:.3f} ± {r.spread:.3f}", " ".join(f"{v:.3f}" for v in r.per_seed)) for r in s.rows]
    w = [max(len(c[i]) for c in [("", head, "per seed"), *cells]) for i in range(3)]
    lines = [f"| {'':<{w[0]}} | {head:<{w[1]}} | {'per seed':<{w[2]}} |",
             "|" + "|".join("-" * (x + 2) for x in w) + "|"]
    lines += [f"| {a:<{w[0]}} | {b:<{w[1]}} | {c:<{w[2]}} |" for a, b, c in cells]
    before, opd, brts = s.rows
    lines.append("")
    lines.append(f"BRTS - OPD: {brts.mean - opd.mean:+.3f}; BRTS - before: {brts.mean - before.mean:+.3f} "
                 f"({'BRTS >= OPD' if brts.mean >= opd.mean else 'BRTS < OPD'} on this run)")
    t = s.tiers
    lines.append(f"Tier composition of the BRTS runs' prompts: Tier 1 {_pct(t['1'])}, Tier 2 {_pct(t['2'])}, "
                 f"Tier 3 {_pct(t['3'])}, skipped {_pct(t['skip'])}; Tier 2 drawn {s.tier2['drawn']}, "
                 f"rescued {s.tier2['rescued']}, leaking hints dropped {s.tier2['leaked']}")
    p = s.prewarm
    if p:
        lines.append(f"Teacher cache: prewarm found {p.get('cache_hits', 0)}/{p.get('prompts', 0)} prompts already "
                     f"cached, generated {p.get('tokens_generated', 0)} tokens in {p.get('seconds', 0.0):.1f} s; "
                     f"training GetCandidates hit rate {_pct(s.train_hit_rate)}")
    else:
        lines.append(f"Teacher cache: training GetCandidates hit rate {_pct(s.train_hit_rate)}")
    if s.timings:
        lines.append("Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in s.timings.items()))
    return "\n".join(lines)
