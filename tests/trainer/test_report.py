"""`brts report` on synthetic runs (issue #24): every plot is written, runs without a teacher branch stay out of
the teacher-side plots, panels wrap into a grid, and a step-0 evaluation shows as the first point."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from brts.trainer import report  # noqa: E402 - after the backend is chosen


def _write_run(folder: Path, teacher: bool, steps: int = 3, start: bool = False) -> Path:
    folder.mkdir(parents=True)
    lines = [{"step": 0, "eval/amc23/mean@2": 0.1}] if start else []
    for step in range(1, steps + 1):
        rec = {"step": step, "loss": 1.0 / step, "loss/student_context": 0.8 / step,
               "loss/teacher_context": 0.2 / step if teacher else 0.0, "tokens/teacher_context": 40 if teacher else 0,
               "sc_student_mass": 0.9, "sc_teacher_mass": 0.7, "time/step": 1.0,
               "eval/amc23/mean@2": 0.1 + 0.1 * step, "eval/aime24/mean@2": 0.05 * step}
        if teacher:
            rec.update({"tier/1": 0.5, "tier/2": 0.25, "tier/3": 0.25, "tier/skip": 0.0, "overlap/chosen": 0.6,
                        "overlap/others": 0.5, "cache_hit_rate": 1.0, "tier1_any_correct": 0.5,
                        "tier1_candidate_accuracy": 0.3, "tier1_catch_rate_iid": 0.51, "tc_teacher_mass": 0.95,
                        "tc_student_mass": 0.6})
        else:
            rec.update({k: None for k, _ in report.TIERS})
        lines.append(rec)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_every_plot_is_written_and_opd_stays_out_of_the_teacher_side(tmp_path, monkeypatch):
    brts = _write_run(tmp_path / "brts-seed0", teacher=True, start=True)
    opd = _write_run(tmp_path / "opd-seed0", teacher=False)
    drawn: dict[str, set[str]] = {}
    original = report._lines

    def spy(ax, runs, colours, keys, ylabel, title=""):  # noqa: ANN001 - a pass-through spy
        for key, _, _ in keys:
            drawn.setdefault(key, set()).update(runs)
        return original(ax, runs, colours, keys, ylabel, title)

    monkeypatch.setattr(report, "_lines", spy)
    files = report.write_report([brts, opd], tmp_path / "out",
                                start_points={"opd-seed0": {"eval/amc23/mean@2": 0.1}, "brts-seed0": {"x": 9.0}})
    assert {p.name for p in files} == {*report.PLOTS, "summary.md"}
    assert all(p.stat().st_size > 0 for p in files)
    for key in ("loss/teacher_context", "overlap/chosen", "cache_hit_rate", "tier1_catch_rate_iid",
                "tc_teacher_mass"):
        assert drawn[key] == {"brts-seed0"}, key  # teacher-side: the OPD run is left out
    assert drawn["loss/student_context"] == drawn["sc_student_mass"] == {"brts-seed0", "opd-seed0"}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| opd-seed0 | 0 | – | 0.1 |" in summary and "| brts-seed0 | 0 | – | 0.1 |" in summary  # step-0 points


def test_start_points_fill_in_only_where_a_run_has_no_step_zero():
    runs = {"a": [{"step": 0, "m": 1.0}, {"step": 1}], "b": [{"step": 1}]}
    out = report._with_start_points(runs, {"a": {"m": 5.0}, "b": {"m": 2.0}})
    assert out["a"][0] == {"step": 0, "m": 1.0} and out["b"][0] == {"step": 0, "m": 2.0}


def test_panels_wrap_into_a_grid():
    import matplotlib.pyplot as plt

    fig, axes = report._grid(plt, 7)
    assert len(axes) == 7 and fig.axes[0].get_gridspec().get_geometry() == (3, 3)
    assert sum(ax.get_visible() for ax in fig.axes) == 7
    plt.close(fig)


def test_has_teacher_branch():
    assert report.has_teacher_branch([{"step": 1, "tokens/teacher_context": 3}])
    assert report.has_teacher_branch([{"step": 1, "tier/1": 0.0, "tokens/teacher_context": 0}])
    assert not report.has_teacher_branch([{"step": 1, "tokens/teacher_context": 0, "tier/1": None}])
