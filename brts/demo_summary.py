"""The demo's result table, computed from its outputs only (pure: no I/O, no torch).

Why a separate module: the numbers the demo prints are the claim it makes ("BRTS beat OPD by this much, over these
seeds"), so they are computed by small functions that a test can feed by hand: accuracy per evaluation set (the
training problems, the held-out ones) and seed, before training and after each method, the Tier composition the BRTS
runs actually trained on, the chosen candidates' overlap gap, and the teacher-cache hit rates; with two teachers
(``brts demo --teachers 2``) a fourth row, the pooled BRTS runs, and which teacher their rule chose how often.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["POOL_LABEL", "ROW_LABELS", "SET_LABELS", "Accuracy", "DemoSummary", "PoolSummary", "accuracy", "final_eval",
           "format_summary", "overlap_gap", "summarize", "teacher_shares", "tier_composition"]


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
POOL_LABEL = "after BRTS, 2-teacher pool"


@dataclass(frozen=True)
class PoolSummary:
    """What the pooled BRTS runs trained on: Tier composition, Tier-2 counts, training hit rate, and per teacher
    (``teacher_shares``) how often the rule chose a candidate it wrote; the second teacher's prewarm counts."""

    tiers: dict[str, float]
    tier2: dict[str, int]
    train_hit_rate: float
    shares: dict[str, dict[str, float]]
    second_prewarm: dict[str, Any] = field(default_factory=dict)


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
    pool: PoolSummary | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": f"mean@{self.eval_n}",
            "accuracy": {name: {r.label: {"mean": r.mean, "spread": r.spread, "per_seed": list(r.per_seed)}
                                for r in rows} for name, rows in self.sets.items()},
            "tiers": self.tiers, "tier2": self.tier2, "train_cache_hit_rate": self.train_hit_rate,
            "overlap": self.overlap, "prewarm": self.prewarm, "timings_s": self.timings,
            **({"pool": asdict(self.pool)} if self.pool else {}),
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


def teacher_shares(runs: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per teacher of a cross-teacher pool: the share of all chosen candidates it wrote (``all``), of each tier's
    (``tier1``..``tier3``; NaN where no prompt reached that tier), how many prompts that is (``chosen``), and its
    chosen candidates' overlap with the live student (``overlap``: its per-step values averaged over the steps that
    have one; NaN if never chosen where overlap counts).

    A metrics line gives per-step ratios (``chosen/NAME/tier/T``: its share of tier T's choices, ``tier/T``: tier
    T's share of the step's prompts), so the counts are rebuilt as prompts x tier share x teacher share and summed
    over steps and runs: every step then weighs by its prompts, not equally."""
    counts: dict[str, dict[str, float]] = {}
    overlaps: dict[str, list[float]] = {}
    for records in runs:
        for r in records:
            prompts = float(r.get("prompts", 1))
            for key, value in r.items():
                parts = key.split("/")
                if value is None:
                    continue
                if parts[0] == "chosen" and len(parts) == 4 and parts[2] == "tier":
                    tier_share = float(r.get(f"tier/{parts[3]}") or 0.0)
                    counts.setdefault(parts[1], {"1": 0.0, "2": 0.0, "3": 0.0})[parts[3]] += (
                        prompts * tier_share * float(value))
                elif parts[:2] == ["overlap", "chosen"] and len(parts) == 3:
                    overlaps.setdefault(parts[2], []).append(float(value))
    per_tier = {t: sum(c[t] for c in counts.values()) for t in ("1", "2", "3")}
    total = sum(per_tier.values())
    out = {}
    for name, c in sorted(counts.items()):
        mine = overlaps.get(name, [])
        out[name] = {"chosen": sum(c.values()), "all": sum(c.values()) / total if total else math.nan,
                     **{f"tier{t}": c[t] / per_tier[t] if per_tier[t] else math.nan for t in per_tier},
                     "overlap": sum(mine) / len(mine) if mine else math.nan}
    return out


def summarize(before: Mapping[str, Sequence[float]], brts_runs: Sequence[Sequence[Mapping[str, Any]]],
              opd_runs: Sequence[Sequence[Mapping[str, Any]]], eval_n: int, prewarm: Mapping[str, Any] | None = None,
              timings: Mapping[str, float] | None = None, pool_runs: Sequence[Sequence[Mapping[str, Any]]] = (),
              second_prewarm: Mapping[str, Any] | None = None) -> DemoSummary:
    """The table's content: per evaluation set (``before`` names them: ``{set: [value per seed]}``), the before /
    after OPD / after BRTS (/ after the pooled BRTS, when ``pool_runs`` are given) accuracies, one value per seed
    each; the BRTS runs' Tier composition, overlap gap and training-time cache hit rate (OPD has no teacher branch,
    so no candidates); the pooled runs' own composition and teachers' shares."""
    tiers, tier2 = tier_composition(brts_runs)
    sets = {}
    for name, values in before.items():
        metric = f"eval/{name}/mean@{eval_n}"
        rows = [accuracy(ROW_LABELS[0], values), accuracy(ROW_LABELS[1], [final_eval(r, metric) for r in opd_runs]),
                accuracy(ROW_LABELS[2], [final_eval(r, metric) for r in brts_runs])]
        if pool_runs:
            rows.append(accuracy(POOL_LABEL, [final_eval(r, metric) for r in pool_runs]))
        sets[name] = tuple(rows)
    pool = None
    if pool_runs:
        pool_tiers, pool_tier2 = tier_composition(pool_runs)
        pool = PoolSummary(pool_tiers, pool_tier2, mean_hit_rate(pool_runs), teacher_shares(pool_runs),
                           dict(second_prewarm or {}))
    return DemoSummary(eval_n, sets, tiers, tier2, mean_hit_rate(brts_runs), overlap_gap(brts_runs),
                       dict(prewarm or {}), dict(timings or {}), pool)


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
    for i, label in enumerate(r.label for r in next(iter(s.sets.values()))):
        row = [label]
        for rows in s.sets.values():
            r = rows[i]
            row += [f"{r.mean:.3f} ± {r.spread:.3f}", " ".join(f"{v:.3f}" for v in r.per_seed)]
        cells.append(row)
    return _markdown(head, cells)


def _markdown(head: list[str], cells: list[list[str]]) -> list[str]:
    """A Markdown table with padded columns (it reads the same in a terminal and in ``summary.md``)."""
    w = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    lines = ["| " + " | ".join(f"{h:<{x}}" for h, x in zip(head, w)) + " |", "|" + "|".join("-" * (x + 2) for x in w)
             + "|"]
    return lines + ["| " + " | ".join(f"{c:<{x}}" for c, x in zip(row, w)) + " |" for row in cells]


def _tier_line(whose: str, t: Mapping[str, float], tier2: Mapping[str, int]) -> str:
    return (f"Tier composition of {whose} prompts: Tier 1 {_pct(t['1'])}, Tier 2 {_pct(t['2'])}, "
            f"Tier 3 {_pct(t['3'])}, skipped {_pct(t['skip'])}; Tier 2 drawn {tier2['drawn']}, "
            f"rescued {tier2['rescued']}, leaking hints dropped {tier2['leaked']}")


def _prewarm_line(whose: str, p: Mapping[str, Any]) -> str:
    return (f"{whose}: prewarm found {p.get('cache_hits', 0)}/{p.get('prompts', 0)} prompts already cached, generated "
            f"{p.get('tokens_generated', 0)} tokens in {p.get('seconds', 0.0):.1f} s")


def _pool_lines(pool: PoolSummary) -> list[str]:
    """The teachers' shares: per teacher, the share of the pooled runs' choices (all, per tier) it wrote."""
    head = ["teacher", "chosen (all tiers)", "Tier 1", "Tier 2", "Tier 3", "overlap of its chosen"]
    cells = [[name, f"{_pct(x['all'])} ({x['chosen']:.0f} prompts)", _pct(x["tier1"]), _pct(x["tier2"]),
              _pct(x["tier3"]), "n/a" if math.isnan(x["overlap"]) else f"{x['overlap']:.3f}"]
             for name, x in pool.shares.items()]
    lines = ["", "Which teacher wrote the candidate the pooled BRTS runs chose (share of each tier's prompts):", ""]
    lines += [*_markdown(head, cells), "", _tier_line("the pooled runs'", pool.tiers, pool.tier2)
              + f"; training GetCandidates hit rate {_pct(pool.train_hit_rate)}"]
    if pool.second_prewarm:
        lines.append(_prewarm_line("Second teacher's cache", pool.second_prewarm))
    return lines


def format_summary(s: DemoSummary) -> str:
    """The printed table and the lines under it (Markdown, so the same text goes into ``summary.md``)."""
    lines = _table(s)
    lines.append("")
    for name, (before, opd, brts, *pool) in s.sets.items():
        lines.append(f"{SET_LABELS.get(name, name)}: BRTS - OPD: {_signed(brts.mean - opd.mean)}; BRTS - before: "
                     f"{_signed(brts.mean - before.mean)}; OPD - before: {_signed(opd.mean - before.mean)} "
                     f"({'BRTS >= OPD' if brts.mean >= opd.mean else 'BRTS < OPD'} on this run)"
                     + "".join(f"; pool - BRTS: {_signed(q.mean - brts.mean)}; pool - OPD: "
                               f"{_signed(q.mean - opd.mean)}" for q in pool))
    lines.append(_tier_line("the BRTS runs'", s.tiers, s.tier2))
    if s.overlap:
        o = s.overlap
        lines.append(f"Top-K overlap with the live student: chosen candidate {o['chosen']:.3f}, the others "
                     f"{o['others']:.3f} (gap {_signed(o['gap'])}, over {o['steps']:.0f} steps)")
    hits = f"training GetCandidates hit rate {_pct(s.train_hit_rate)}"
    lines.append(f"{_prewarm_line('Teacher cache', s.prewarm)}; {hits}" if s.prewarm else f"Teacher cache: {hits}")
    if s.pool:
        lines += _pool_lines(s.pool)
    if s.timings:
        lines.append("Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in s.timings.items()))
    return "\n".join(lines)
