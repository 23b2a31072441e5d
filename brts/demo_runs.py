"""The demo's moving parts: the teacher server process, its prewarm, the untrained student's evaluation, and the
``brts train`` processes with their resume-or-start decision.

Why apart from ``brts.demo``: these are the pieces that start processes and read their outputs; ``brts.demo``
decides what to run (settings, files, order) and prints the result. Each piece is resumable on its own: a finished
evaluation or run is read back from its folder, a run with a checkpoint is resumed, anything else starts fresh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from brts.demo import DemoPaths, DemoSettings

__all__ = ["METHODS", "POOL", "POOL_METHOD", "SECOND", "DemoError", "Server", "eval_before", "last_line", "methods",
           "prewarm_demo", "prompt_config", "records", "train_command", "train_pair"]

#: The second toy teacher's name in the pooled run's ``teachers:`` (the first is the routed ``default``).
SECOND = "second"
#: Each method's settings over the demo's base config (one teacher: the ``server`` shorthand, i.e. ``default``).
METHODS: dict[str, dict[str, Any]] = {"brts": {}, "opd": {"teacher_branch": False}}
#: ``brts demo --teachers 2``: BRTS with the cross-teacher pool (issue #27). The addresses are placeholders: every
#: ``brts train`` the demo starts names the running servers' ports on its command line (``train_command``).
POOL_METHOD = "brts-pool"
POOL: dict[str, dict[str, Any]] = {POOL_METHOD: {
    "teachers": {"default": {"address": "127.0.0.1:50051"}, SECOND: {"address": "127.0.0.1:50052"}},
    "candidate_teachers": ["default", SECOND]}}

_LISTENING = re.compile(r"listening on (\S+:\d+)")
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def methods(s: DemoSettings) -> dict[str, dict[str, Any]]:
    """The methods this demo trains, in the table's order (the pool only with two teachers)."""
    return {**METHODS, **(POOL if s.teachers == 2 else {})}


class DemoError(RuntimeError):
    """A demo step failed; the message names the step and the log to read."""


def prompt_config() -> dict[str, Any]:
    from brts.toy_task import TOY_CHAT_TEMPLATE

    return {"tokenizer": "qwen2.5-instruct", "chat_template": TOY_CHAT_TEMPLATE, "instruction_suffix": "",
            "max_prompt_len": 256}


class Server:
    """``brts serve`` of one toy teacher on loopback with a free port, its output in a log; stopped with SIGTERM."""

    def __init__(self, model: Path, cache: Path, log: Path, s: DemoSettings) -> None:
        self.log, self.cache = log, cache
        self._cmd = [sys.executable, "-m", "brts.cli", "serve", "--model", str(model), "--cache", str(cache),
                     "--port", "0", f"sampling.max_new_tokens={s.max_new_tokens}"]
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self, timeout: float = 180.0) -> str:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self._cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = _LISTENING.search(self.log.read_text(errors="replace"))
            if m:
                self.address = m.group(1)
                return self.address
            if self.proc.poll() is not None:
                raise DemoError(f"the teacher server exited ({self.proc.returncode}) before listening: "
                                f"{last_line(self.log)} (log: {self.log})")
            time.sleep(0.2)
        raise DemoError(f"the teacher server did not listen within {timeout:.0f} s (log: {self.log})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def prewarm_demo(address: str, paths: DemoPaths, s: DemoSettings, tier2: bool = True) -> dict[str, Any]:
    """Prewarm a server over the training problems (the held-out ones are never asked of a teacher). ``tier2``
    False is the pool's second teacher: the pool asks it for its Tier-1 window only (Tier 2 is drawn from the
    prompt's routed teacher, ``default``), so that is what fills its cache."""
    from brts.server.prewarm import prewarm
    from brts.shared.client import TeacherClient
    from brts.shared.config import PrewarmConfig, from_dict

    cfg = from_dict(PrewarmConfig, {"server": address, "dataset": str(paths.problems), "n_tier1": s.n_candidates,
                                    "n_tier2": s.n_tier2 if tier2 else 0, "logprob_k": s.logprob_k,
                                    "prompt": prompt_config()})
    with TeacherClient(address) as client:
        summary = prewarm(cfg, client, progress=True)
    return asdict(summary)


def eval_before(paths: DemoPaths, s: DemoSettings, seeds: list[int]) -> dict[str, list[float]]:
    """The untrained student on every evaluation set, with the same per-sample seeds as each run's final
    evaluation; returns ``{set name: [value per seed]}`` (a seed evaluated before is read back, not redone)."""
    from brts.shared.config import EvalConfig, from_dict
    from brts.shared.engines import make_engine
    from brts.trainer.evaluate import evaluate

    def config(seed: int) -> Any:
        return from_dict(EvalConfig, {
            "model": str(paths.student), "benchmarks": [], "dataset": [str(f) for f in paths.eval_files(s)],
            "n": s.eval_n, "temperature": s.eval_temperature, "max_new_tokens": s.max_new_tokens, "engine": "hf",
            "out": str(paths.eval_before / f"seed{seed}"), "seed": seed, "prompt": prompt_config()})

    key = f"mean@{s.eval_n}"
    names = paths.eval_names(s)
    values: dict[int, dict[str, float]] = {}
    todo = []
    for seed in seeds:
        done = paths.eval_before / f"seed{seed}" / "summary.json"
        saved = json.loads(done.read_text())["benchmarks"] if done.is_file() else {}
        if all(name in saved for name in names):
            values[seed] = {name: float(saved[name][key]) for name in names}
        else:
            todo.append(seed)
    if todo:
        engine = make_engine("hf", paths.student, device="cpu", dtype="float32")
        try:
            for seed in todo:
                values[seed] = {r.name: float(r.scores[key]) for r in evaluate(config(seed), engine=engine,
                                                                               progress=False)}
        finally:
            engine.close()
    return {name: [values[seed][name] for seed in seeds] for name in names}


def records(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics lines (none yet: an empty list)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def _reach(method: str, addresses: dict[str, str]) -> list[str]:
    """The overrides that point a run at this demo's servers (their ports are new each time the demo starts)."""
    teachers = POOL.get(method, {}).get("teachers")
    if teachers:
        return [f"teachers.{name}.address={addresses[name]}" for name in teachers]
    return [f"server={addresses['default']}"]


def train_command(paths: DemoPaths, s: DemoSettings, configs: dict[str, Path], method: str, seed: int,
                  addresses: dict[str, str]) -> list[str] | None:
    """The `brts train` command that finishes this run: None when it is done, a resume when it has a checkpoint
    short of the end, else a fresh start (a folder without checkpoints holds nothing worth keeping).
    ``addresses``: the running servers by teacher name (``default``, and ``second`` with two teachers)."""
    run_dir = paths.run_dir(method, seed)
    lines = records(run_dir)
    if any(r.get("step") == s.steps and all(m in r for m in s.metrics) for r in lines):
        return None
    train = [sys.executable, "-m", "brts.cli", "train"]
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*")) and \
            (not lines or lines[-1].get("step", 0) < s.steps):
        return [*train, "--resume", str(run_dir), *_reach(method, addresses)]
    shutil.rmtree(run_dir, ignore_errors=True)
    return [*train, "--config", str(configs[method]), f"seed={seed}", f"run_dir={run_dir}",
            *_reach(method, addresses)]


def train_pair(paths: DemoPaths, s: DemoSettings, configs: dict[str, Path], seed: int, addresses: dict[str, str],
               bar: Any, all_runs: list[Path]) -> None:
    """Every method's run of one seed, side by side (one thread each); the bar counts finished steps."""
    procs: list[tuple[str, subprocess.Popen, Path]] = []
    try:
        for method in methods(s):
            cmd = train_command(paths, s, configs, method, seed, addresses)
            if cmd is None:
                continue
            log = paths.logs / f"train-{method}-seed{seed}.log"
            with open(log, "a") as f:
                f.write(f"$ {' '.join(cmd)}\n")
                f.flush()
                procs.append((method, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                                       env=dict(os.environ, **_CHILD_ENV),
                                                       start_new_session=True), log))
        while any(p.poll() is None for _, p, _ in procs):
            done = sum(_progress(run_dir) for run_dir in all_runs)
            if done > bar.n:
                bar.update(done - bar.n)
            time.sleep(0.5)
    except BaseException:
        for _, p, _ in procs:  # a SIGTERM makes each run checkpoint and stop; the next demo resumes it
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p, _ in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    for method, p, log in procs:
        if p.returncode != 0:
            raise DemoError(f"{method} seed {seed}: brts train exited {p.returncode}: {last_line(log)} (log: {log})")


def _progress(run_dir: Path) -> int:
    """Steps a run has finished (its last metrics line)."""
    return max((int(r.get("step", 0)) for r in records(run_dir)), default=0)
