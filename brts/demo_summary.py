"""The demo's result table, computed from its outputs only (pure: no I/O, no torch).

Why a separate module: the numbers the demo prints are the claim it makes ("BRTS beat OPD by this much, over these
seeds"), so they are computed by small functions that a test can feed by hand: accuracy per evaluation set (the
training problems, the held-out ones) and seed, before training and after each method, the Tier composition the BRTS
runs actually trained on, the chosen candidates' overlap gap, and the teacher-cache hit rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["ROW_LABELS", "SET_LABELS", "Accuracy", "DemoSummary", "accuracy", "final_eval", "format_summary",
           "overlap_gap", "summarize", "tier_composition"]


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


SET_LABELS = {"problems": "training problems", "held_out": "held-out problems"}
ROW_LABELS = ("before (untrained student)", "after OPD (student-only)", "after BRTS")


@dataclass(frozen=True)
class DemoSummary:
    """The demo's claim: per evaluation set, the (before, after OPD, after BRTS) rows; what BRTS trained on."""

    eval_n: int
    sets: dict[str, tuple[Accuracy, ...]]
    tiers: dict[str, float]
    tier2: dict[str, int]
    train_hit_rate: float
    overlap: dict[str, float] = field(default_factory=dict)
    prewarm: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": f"mean@{self.eval_n}",
            "accuracy": {name: {r.label: {"mean": r.mean, "spread": r.spread, "per_seed": list(r.per_seed)}
                                for r in rows} for name, rows in self.sets.items()},
            "tiers": self.tiers, "tier2": self.tier2, "train_cache_hit_rate": self.train_hit_rate,
            "overlap": self.overlap, "prewarm": self.prewarm, "timings_s": self.timings,
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


def overlap_gap(runs: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, float]:
    """The chosen candidate's top-K overlap with the live student beside the other candidates', averaged over
    every step that has both: a gap near 0 means "closest to the student" decided nothing (issue #25)."""
    pairs = [(float(r["overlap/chosen"]), float(r["overlap/others"])) for records in runs for r in records
             if r.get("overlap/chosen") is not None and r.get("overlap/others") is not None]
    if not pairs:
        return {}
    chosen, others = (sum(x) / len(pairs) for x in zip(*pairs))
    return {"chosen": chosen, "others": others, "gap": chosen - others, "steps": float(len(pairs))}


def summarize(before: Mapping[str, Sequence[float]], brts_runs: Sequence[Sequence[Mapping[str, Any]]],
              opd_runs: Sequence[Sequence[Mapping[str, Any]]], eval_n: int, prewarm: Mapping[str, Any] | None = None,
              timings: Mapping[str, float] | None = None) -> DemoSummary:
    """The table's content: per evaluation set (``before`` names them: ``{set: [value per seed]}``), the before /
    after OPD / after BRTS accuracies, one value per seed each; the BRTS runs' Tier composition, overlap gap and
    training-time cache hit rate (OPD has no teacher branch, so no candidates)."""
    tiers, tier2 = tier_composition(brts_runs)
    sets = {}
    for name, values in before.items():
        metric = f"eval/{name}/mean@{eval_n}"
        sets[name] = (accuracy(ROW_LABELS[0], values),
                      accuracy(ROW_LABELS[1], [final_eval(r, metric) for r in opd_runs]),
                      accuracy(ROW_LABELS[2], [final_eval(r, metric) for r in brts_runs]))
    return DemoSummary(eval_n, sets, tiers, tier2, mean_hit_rate(brts_runs), overlap_gap(brts_runs),
                       dict(prewarm or {}), dict(timings or {}))


def _signed(x: float) -> str:
    """A difference with its sign, never "-0.000" (a gap of -0.00001 prints as +0.000)."""
    return f"{round(x, 3) + 0.0:+.3f}"


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.0%}"


def _table(s: DemoSummary) -> list[str]:
    """One row per model, two columns per evaluation set: mean ± sd over seeds, and the values per seed."""
    head = [""]
    for name in s.sets:
        head += [f"{SET_LABELS.get(name, name)}: mean@{s.eval_n} (mean ± sd)", "per seed"]
    cells = []
    for i, label in enumerate(ROW_LABELS):
        row = [label]
        for rows in s.sets.values():
            r = rows[i]
            row += [f"{r.mean:.3f} ± {r.spread:.3f}", " ".join(f"{v:.3f}" for v in r.per_seed)]
        cells.append(row)
    w = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    lines = ["| " + " | ".join(f"{h:<{x}}" for h, x in zip(head, w)) + " |", "|" + "|".join("-" * (x + 2) for x in w)
             + "|"]
    return lines + ["| " + " | ".join(f"{c:<{x}}" for c, x in zip(row, w)) + " |" for row in cells]


def format_summary(s: DemoSummary) -> str:
    """The printed table and the lines under it (Markdown, so the same text goes into ``summary.md``)."""
    lines = _table(s)
    lines.append("")
    for name, (before, opd, brts) in s.sets.items():
        lines.append(f"{SET_LABELS.get(name, name)}: BRTS - OPD: {_signed(brts.mean - opd.mean)}; BRTS - before: "
                     f"{_signed(brts.mean - before.mean)}; OPD - before: {_signed(opd.mean - before.mean)} "
                     f"({'BRTS >= OPD' if brts.mean >= opd.mean else 'BRTS < OPD'} on this run)")
    t = s.tiers
    lines.append(f"Tier composition of the BRTS runs' prompts: Tier 1 {_pct(t['1'])}, Tier 2 {_pct(t['2'])}, "
                 f"Tier 3 {_pct(t['3'])}, skipped {_pct(t['skip'])}; Tier 2 drawn {s.tier2['drawn']}, "
                 f"rescued {s.tier2['rescued']}, leaking hints dropped {s.tier2['leaked']}")
    if s.overlap:
        o = s.overlap
        lines.append(f"Top-K overlap with the live student: chosen candidate {o['chosen']:.3f}, the others "
                     f"{o['others']:.3f} (gap {_signed(o['gap'])}, over {o['steps']:.0f} steps)")
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
