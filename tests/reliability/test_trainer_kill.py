"""The trainer killed mid-run and resumed: the steps after the checkpoint reproduce the uninterrupted run's losses.

Why it matters: a preempted or crashed training job must resume as if nothing happened, or its curves cannot be
trusted. The run gets a SIGTERM after step 1 (the launcher passes it on; the ranks checkpoint and stop), is resumed,
and then the launcher, torchrun and both ranks are killed with SIGKILL in the middle of step 3 (no cleanup at all);
the next resume must replay nothing twice and give step 3's losses of the uninterrupted run (the session fixture
``uninterrupted`` of tests/conftest.py, shared with tests/trainer/test_train_e2e.py so it is trained only once).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "trainer"))
from train_env import BRTS, kill_group, metrics, one_line, start_train, train, wait_for_step  # noqa: E402


def test_sigterm_then_kill_9_then_resume_matches_the_uninterrupted_run(e2e_env, uninterrupted, tmp_path):
    _, run_a = uninterrupted
    run = e2e_env["root"] / "run-b"
    proc = start_train("--config", str(e2e_env["config"]("run-b", save_every=2)), log=tmp_path / "1.log")
    try:
        wait_for_step(run, 1, proc)
        proc.send_signal(signal.SIGTERM)  # to the launcher only: it passes it on, the ranks checkpoint and stop
        assert proc.wait(timeout=120) == 0, (tmp_path / "1.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_group(proc)
    stopped = [x["step"] for x in metrics(run)]
    assert f"stopped by a signal after step {stopped[-1]}" in (tmp_path / "1.log").read_text()
    assert (run / "checkpoints" / f"step_{stopped[-1]:06d}" / "COMPLETE").is_file()
    if stopped[-1] < 2:
        proc = start_train("--resume", str(run), "save_every=1", log=tmp_path / "2.log")
        try:
            wait_for_step(run, 2, proc)
        finally:
            kill_group(proc)  # kill -9 the launcher, torchrun and both ranks, mid step 3
    assert [x["step"] for x in metrics(run)] == [1, 2]
    again = train("--resume", str(run))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "steps 3..3" in again.stdout
    a, b = metrics(run_a), metrics(run)
    assert [x["step"] for x in b] == [1, 2, 3]
    for key in ("loss", "loss/student_context", "loss/teacher_context", "grad_norm"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-6, abs=1e-7), key
    # `brts report` on the two runs side by side (run-a also evaluated in training)
    report = subprocess.run([*BRTS, "report", str(run_a), str(run), "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    for name in ("losses.png", "tiers.png", "overlap.png", "cache_hits.png", "eval.png"):
        png = tmp_path / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| run-a | 3 |" in summary and "| run-b | 3 |" in summary and "amc23" in summary
    # a fresh start on a run_dir with checkpoints is refused, not overwritten
    refused = train("--config", str(e2e_env["root"] / "run-b.yaml"))
    assert refused.returncode == 1 and "already holds checkpoints" in one_line(refused.stderr)
