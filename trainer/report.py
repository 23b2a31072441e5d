"""`brts report RUN_DIR [RUN_DIR ...]`: PNG plots and a Markdown summary of one or several runs, side by side.

Why from ``metrics.jsonl`` only: it is the one record every run writes (and keeps free of duplicate steps across
resumes), so a report can be made while a run is going, after it crashed, or on a copy of the run directory.
Several runs share the axes of every plot, one colour per run in every plot (BRTS vs the OPD baseline). Runs
without a teacher branch (OPD) are left out of the teacher-side plots (L_TC, tiers, overlap, cache hits, the Tier-1
catch rate, the teacher-context masses) instead of showing up there as empty panels or a flat zero line; panels
that come one per run or per benchmark wrap into a grid. A step-0 evaluation (``eval_at_start``, or the points a
caller passes, e.g. the demo's evaluation of the untrained student) shows as the first point of ``eval.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.ticker import MaxNLocator

__all__ = ["load_run", "write_report"]

TIERS = (("tier/1", "Tier 1 (correct)"), ("tier/2", "Tier 2 (hinted)"), ("tier/3", "Tier 3 (most similar)"),
         ("tier/skip", "no teacher branch"))
PLOTS = ("losses.png", "tiers.png", "overlap.png", "cache_hits.png", "tier1_catch.png", "topk_mass.png", "eval.png")
COLUMNS = 3  # panels per row before a grid wraps
Runs = dict[str, list[dict[str, Any]]]


def load_run(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a `brts train` run directory?)")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path}: empty, the run has not finished a step yet")
    return records


def has_teacher_branch(records: Sequence[dict[str, Any]]) -> bool:
    """A run trained on the teacher-context branch at some step (OPD's records have no tier shares and no
    teacher-context tokens)."""
    return any((r.get("tokens/teacher_context") or 0) > 0 or any(r.get(k) is not None for k, _ in TIERS[:3])
               for r in records)


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _lines(ax: Any, runs: Runs, colours: Mapping[str, str], keys: Sequence[tuple[str, str, str]],
           ylabel: str, title: str = "") -> bool:
    drawn = False
    for name, records in runs.items():
        for key, label, style in keys:
            xs, ys = _series(records, key)
            if xs:
                ax.plot(xs, ys, style, color=colours[name], label=f"{name}: {label}" if len(colours) > 1 else label,
                        marker=".")
                drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    return drawn


def _grid(plt: Any, n: int, width: float = 5.0, height: float = 3.8) -> tuple[Any, list[Any]]:
    """A figure of ``n`` panels, ``COLUMNS`` to a row; the unused cells of the last row are hidden."""
    cols = max(1, min(COLUMNS, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _with_start_points(runs: Runs, start_points: Mapping[str, Mapping[str, float]] | None) -> Runs:
    """Each run's records with a step-0 record from ``start_points`` (by run name) when the run has none."""
    out: Runs = {}
    for name, records in runs.items():
        extra = (start_points or {}).get(name)
        if extra and not any(r.get("step") == 0 for r in records):
            records = [{"step": 0, **extra}, *records]
        out[name] = records
    return out


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None,
                 start_points: Mapping[str, Mapping[str, float]] | None = None) -> list[Path]:
    """Write the plots and ``summary.md`` to ``out`` (default: the first run's ``report`` folder); returns the files.

    ``start_points``: per run (its folder name, as the plots label it), metrics of a step-0 evaluation made
    elsewhere, drawn as the first point of ``eval.png`` for a run whose own metrics have no step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).resolve().name: load_run(d) for d in run_dirs}
    if len(runs) != len(run_dirs):
        runs = {str(Path(d)): load_run(d) for d in run_dirs}  # same folder names: use the paths
    runs = _with_start_points(runs, start_points)
    folder = Path(out) if out is not None else Path(run_dirs[0]) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    colours = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    teacher = {name: records for name, records in runs.items() if has_teacher_branch(records)}
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = folder / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    _plot_training(plt, runs, teacher, colours, save)
    _plot_teachers(plt, runs, save)
    eval_keys = sorted({k for records in runs.values() for r in records for k in r
                        if k.startswith("eval/") and "/mean@" in k})
    if eval_keys:
        fig, axes = _grid(plt, len(eval_keys))
        for ax, key in zip(axes, eval_keys):
            _lines(ax, runs, colours, [(key, key.split("/", 2)[2], "-")], "accuracy", key.split("/")[1])
            ax.set_ylim(-0.02, 1.02)
        save(fig, "eval.png")
    (folder / "summary.md").write_text(_summary(runs, eval_keys, [p.name for p in written]), encoding="utf-8")
    written.append(folder / "summary.md")
    return written


def _plot_training(plt: Any, runs: Runs, teacher: Runs, colours: Mapping[str, str], save: Any) -> None:
    """Every per-step plot but the evaluation: losses, tiers, overlap, cache hits, the Tier-1 catch rate (the
    paper's Fig. 5) and the top-K masses."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _lines(axes[0], runs, colours, [("loss/student_context", "L_SC (student context)", "-")], "loss")
    _lines(axes[1], teacher, colours, [("loss/teacher_context", "L_TC (teacher context)", "--")], "loss")
    save(fig, "losses.png")

    fig, axes = _grid(plt, max(1, len(teacher)), width=5.5, height=4)
    for ax, (name, records) in zip(axes, teacher.items()):
        steps_of = [r for r in records if "loss" in r]  # training steps (not a step-0 evaluation)
        stacks = [[r.get(k) or 0.0 for r in steps_of] for k, _ in TIERS]
        ax.stackplot([r["step"] for r in steps_of], *stacks, labels=[label for _, label in TIERS], alpha=0.8)
        ax.set_title(name, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="step", ylabel="share of prompts", ylim=(0, 1))
        ax.legend(fontsize=7, loc="lower left")
    if not teacher:
        axes[0].text(0.5, 0.5, "no run with a teacher branch", ha="center", va="center", color="grey")
    save(fig, "tiers.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    _lines(ax, teacher, colours, [("overlap/chosen", "chosen", "-"), ("overlap/others", "others", ":")],
           "overlap with student top-K")
    save(fig, "overlap.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    _lines(ax, teacher, colours, [("cache_hit_rate", "cache hit rate", "-")], "share of prompts")
    save(fig, "cache_hits.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    _lines(ax, teacher, colours, [("tier1_any_correct", "catch rate (any Tier-1 correct)", "-"),
                                  ("tier1_catch_rate_iid", "i.i.d. prediction 1-(1-p)^N", "--"),
                                  ("tier1_candidate_accuracy", "per-candidate accuracy p", ":")],
           "share", "Tier-1 catch rate vs the i.i.d. prediction (Fig. 5)")
    ax.set_ylim(-0.02, 1.02)
    save(fig, "tier1_catch.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _lines(axes[0], runs, colours, [("sc_student_mass", "student", "-"), ("sc_teacher_mass", "teacher", "--")],
           "probability mass", "on the student's top-K (student context)")
    _lines(axes[1], teacher, colours, [("tc_teacher_mass", "teacher", "--"), ("tc_student_mass", "student", "-")],
           "probability mass", "on the teacher's top-K (teacher context)")
    # no fixed 0..1 range: confident models keep these within a few percent of 1, where the changes are
    save(fig, "topk_mass.png")


def _plot_teachers(plt: Any, runs: Runs, save: Any) -> None:
    """``teachers.png`` for runs with a cross-teacher pool (``candidate_teachers``): per run, the share of choices
    whose candidate each teacher wrote, step by step (no file when no run pooled teachers)."""
    pooled = {name: records for name, records in runs.items()
              if any(k.startswith("chosen/") and k.endswith("/share") for r in records for k in r)}
    if not pooled:
        return
    fig, axes = _grid(plt, len(pooled), width=5.5, height=4)
    for ax, (name, records) in zip(axes, pooled.items()):
        steps_of = [r for r in records if "loss" in r]
        teachers = sorted({k.split("/")[1] for r in steps_of for k in r
                           if k.startswith("chosen/") and k.endswith("/share")})
        stacks = [[r.get(f"chosen/{t}/share") or 0.0 for r in steps_of] for t in teachers]
        ax.stackplot([r["step"] for r in steps_of], *stacks, labels=teachers, alpha=0.8)
        ax.set_title(f"{name}: whose candidate was chosen", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="step", ylabel="share of choices", ylim=(0, 1))
        ax.legend(fontsize=7, loc="lower left")
    save(fig, "teachers.png")


def _fmt(value: Any) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value:.4g}"


def _summary(runs: Runs, eval_keys: Sequence[str], plots: Sequence[str]) -> str:
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
        lines += ["", "Evaluation (per benchmark, mean@n), first and last:", "", "| run | step | " + " | ".join(
            k.split("/")[1] for k in eval_keys) + " |", "|---|---|" + "---|" * len(eval_keys)]
        for name, records in runs.items():
            evaluated = [r for r in records if any(k in r for k in eval_keys)]
            for r in evaluated[:1] + evaluated[1:][-1:]:
                lines.append(f"| {name} | {r['step']} | " + " | ".join(_fmt(r.get(k)) for k in eval_keys) + " |")
    lines += ["", "Tier shares and overlaps are means over the steps. Plots: " + ", ".join(plots), ""]
    return "\n".join(lines)
