"""`brts report RUN_DIR [RUN_DIR ...]`: PNG plots and a Markdown summary of one or several runs, side by side.

Why from ``metrics.jsonl`` only: it is the one record every run writes (and keeps free of duplicate steps across
resumes), so a report can be made while a run is going, after it crashed, or on a copy of the run directory.
Several runs share the axes of every plot (one colour per run: BRTS vs the OPD baseline), except the tier
composition, which is a stacked area per run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from matplotlib.ticker import MaxNLocator

__all__ = ["load_run", "write_report"]

TIERS = (("tier/1", "Tier 1 (correct)"), ("tier/2", "Tier 2 (hinted)"), ("tier/3", "Tier 3 (most similar)"),
         ("tier/skip", "no teacher branch"))


def load_run(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a `brts train` run directory?)")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path}: empty, the run has not finished a step yet")
    return records


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _lines(ax: Any, runs: dict[str, list[dict[str, Any]]], keys: Sequence[tuple[str, str, str]], ylabel: str) -> bool:
    drawn = False
    for colour, (name, records) in zip(_colours(), runs.items()):
        for key, label, style in keys:
            xs, ys = _series(records, key)
            if xs:
                ax.plot(xs, ys, style, color=colour, label=f"{name}: {label}" if len(runs) > 1 else label, marker=".")
                drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def _colours() -> list[str]:
    return ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write the plots and ``summary.md`` to ``out`` (default: the first run's ``report`` folder); returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).resolve().name: load_run(d) for d in run_dirs}
    if len(runs) != len(run_dirs):
        runs = {str(Path(d)): load_run(d) for d in run_dirs}  # same folder names: use the paths
    folder = Path(out) if out is not None else Path(run_dirs[0]) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = folder / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _lines(axes[0], runs, [("loss/student_context", "L_SC (student context)", "-")], "loss")
    _lines(axes[1], runs, [("loss/teacher_context", "L_TC (teacher context)", "--")], "loss")
    save(fig, "losses.png")

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, (name, records) in zip(axes[0], runs.items()):
        steps = [r["step"] for r in records]
        stacks = [[r.get(k) or 0.0 for r in records] for k, _ in TIERS]
        ax.stackplot(steps, *stacks, labels=[label for _, label in TIERS], alpha=0.8)
        ax.set_title(name, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel("share of prompts")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="lower left")
    save(fig, "tiers.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    _lines(
        ax, runs, [("overlap/chosen", "chosen", "-"), ("overlap/others", "others", ":")], "overlap with student top-K"
    )
    save(fig, "overlap.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    _lines(ax, runs, [("cache_hit_rate", "cache hit rate", "-")], "share of prompts")
    save(fig, "cache_hits.png")

    eval_keys = sorted({k for records in runs.values() for r in records for k in r
                        if k.startswith("eval/") and "/mean@" in k})
    if eval_keys:
        fig, axes = plt.subplots(1, len(eval_keys), figsize=(5 * len(eval_keys), 4), squeeze=False)
        for ax, key in zip(axes[0], eval_keys):
            _lines(ax, runs, [(key, key.split("/", 2)[2], "-")], "accuracy")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(key.split("/")[1], fontsize=9)
        save(fig, "eval.png")

    (folder / "summary.md").write_text(_summary(runs, eval_keys, [p.name for p in written]), encoding="utf-8")
    written.append(folder / "summary.md")
    return written


def _fmt(value: Any) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value:.4g}"


def _summary(runs: dict[str, list[dict[str, Any]]], eval_keys: Sequence[str], plots: Sequence[str]) -> str:
    lines = ["# BRTS run report", "", "| run | steps | L_SC (last) | L_TC (last) | Tier 1 | Tier 2 | Tier 3 | skip | "
             "overlap chosen / others | cache hits | s/step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, records in runs.items():
        last = records[-1]

        def mean(key: str) -> Any:
            vals = [r[key] for r in records if isinstance(r.get(key), (int, float))]
            return sum(vals) / len(vals) if vals else None

        lines.append(f"| {name} | {last['step']} | {_fmt(last.get('loss/student_context'))} | "
                     f"{_fmt(last.get('loss/teacher_context'))} | "
                     + " | ".join(_fmt(mean(k)) for k, _ in TIERS)
                     + f" | {_fmt(mean('overlap/chosen'))} / {_fmt(mean('overlap/others'))} | "
                       f"{_fmt(mean('cache_hit_rate'))} | {_fmt(mean('time/step'))} |")
    if eval_keys:
        lines += ["", "Last evaluation (per benchmark, mean@n):", "", "| run | step | " + " | ".join(
            k.split("/")[1] for k in eval_keys) + " |", "|---|---|" + "---|" * len(eval_keys)]
        for name, records in runs.items():
            evaluated = [r for r in records if any(k in r for k in eval_keys)]
            if evaluated:
                r = evaluated[-1]
                lines.append(f"| {name} | {r['step']} | " + " | ".join(_fmt(r.get(k)) for k in eval_keys) + " |")
    lines += ["", "Tier shares and overlaps are means over the steps. Plots: " + ", ".join(plots), ""]
    return "\n".join(lines)
