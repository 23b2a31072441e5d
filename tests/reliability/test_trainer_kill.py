"""The trainer killed mid-run and resumed: the steps after the checkpoint reproduce the uninterrupted run's losses.

Why it matters: a preempted or crashed training job must resume as if nothing happened, or its curves cannot be
trusted. The run gets a SIGTERM after step 1 (the launcher passes it on; the ranks checkpoint and stop after step 1
or 2), is resumed, and then the launcher, torchrun and both ranks are killed with SIGKILL in step 3 (no cleanup);
the next resume must replay nothing twice and give step 3's losses of the uninterrupted run (the session fixture
``uninterrupted`` of tests/conftest.py, shared with tests/trainer/test_train_e2e.py so it is trained only once).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "trainer"))
from train_env import (  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
    BRTS,
    HANG_S,
    kill_group,
    metrics,
    one_line,
    start_train,
    train,
    wait_for_step,
)


def _wait_for_line(log: Path, needle: str, proc: subprocess.Popen) -> None:
    """Poll the run's log for ``needle``; the process must not end first (a hang guard bounds it)."""
    deadline = time.monotonic() + HANG_S
    while needle not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {needle!r} within {HANG_S:.0f} s"
        time.sleep(0.05)


def test_sigterm_then_kill_9_then_resume_matches_the_uninterrupted_run(e2e_env, uninterrupted, tmp_path):
    _, run_a = uninterrupted
    run = e2e_env["root"] / "run-b"
    proc = start_train("--config", str(e2e_env["config"]("run-b", save_every=2)), log=tmp_path / "1.log")
    try:
        wait_for_step(run, 1, proc)
        proc.send_signal(signal.SIGTERM)  # to the launcher only: it passes it on, the ranks checkpoint and stop
        assert proc.wait(timeout=HANG_S) == 0, (tmp_path / "1.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_group(proc)
    stopped = [x["step"] for x in metrics(run)]
    # the ranks see the signal at the end of step 1 or, when it arrives after that step's stop check, of step 2
    assert stopped in ([1], [1, 2]), stopped
    assert f"stopped by a signal after step {stopped[-1]}" in (tmp_path / "1.log").read_text()
    assert (run / "checkpoints" / f"step_{stopped[-1]:06d}" / "COMPLETE").is_file()
    # resumed, then kill -9 of the launcher, torchrun and both ranks in step 3, whichever step the SIGTERM stopped
    # at: once step 2 is logged (its checkpoint is written before its metrics line), or once the resumed ranks
    # say they start at step 3
    proc = start_train("--resume", str(run), "save_every=1", log=tmp_path / "2.log")
    try:
        if stopped[-1] == 1:
            wait_for_step(run, 2, proc)
        else:
            _wait_for_line(tmp_path / "2.log", "steps 3..3", proc)
    finally:
        kill_group(proc)
    assert [x["step"] for x in metrics(run)] == [1, 2]  # step 3 never finished
    again = train("--resume", str(run))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "steps 3..3" in again.stdout
    a, b = metrics(run_a), metrics(run)
    assert [x["step"] for x in b] == [1, 2, 3]
    # Equal up to the teacher's batching: whether the two ranks' Score calls of a step share one server batch
    # depends on timing, and CPU kernels round a padded batch differently (test_concurrent_clients measures up to
    # 1e-5 nats). A resume that replayed or skipped anything would train other prompts: the step losses of one
    # run differ by more than this tolerance (checked here, so the tolerance cannot hide a wrong resume).
    for key in ("loss", "loss/student_context", "loss/teacher_context", "grad_norm"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-4, abs=1e-6), key
        assert a[2][key] != pytest.approx(a[1][key], rel=1e-4, abs=1e-6), key
    # `brts report` on the two runs side by side (run-a also evaluated in training)
    report = subprocess.run([*BRTS, "report", str(run_a), str(run), "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=HANG_S)
    assert report.returncode == 0, report.stderr
    for name in ("losses.png", "tiers.png", "overlap.png", "cache_hits.png", "eval.png"):
        png = tmp_path / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| run-a | 3 |" in summary and "| run-b | 3 |" in summary and "amc23" in summary
    # a fresh start on a run_dir with checkpoints is refused, not overwritten
    refused = train("--config", str(e2e_env["root"] / "run-b.yaml"))
    assert refused.returncode == 1 and "already holds checkpoints" in one_line(refused.stderr)
