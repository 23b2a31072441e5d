"""`brts demo`: the whole system on a CPU in minutes: toy teacher server + cache, prewarm, BRTS vs OPD, eval, report.

Why it is shaped this way (issue #10): a new user's second command must run the real job, not a mock of it. So the
demo uses the real pieces end to end: a fitted toy teacher (``brts.toy``: good at small sums, yet all four
of its samples sometimes fail, so Tier 2 fires) behind a real ``brts serve`` on loopback with an LMDB cache, a real
prewarm, real ``brts train`` runs (one gloo rank each, the hf rollout engine) of BRTS and of the student-only OPD
baseline with the same budget, over several seeds, the same evaluation code as ``brts eval``, and ``brts report``.

What makes it fit in minutes on 2 cores: the models are tiny (hidden 64) with the real 151,936-row vocabulary, the
responses are ~14 tokens, the BRTS and OPD runs of a seed train side by side (one thread each), the two fits run
side by side, and everything is cached: the fits by their settings, the teacher's candidates by the server, the
evaluations and finished runs by their folders. An interrupted demo resumes where it stopped (runs resume from their
checkpoints); a second demo reuses everything and shows the cache hits (``--retrain`` trains again).

The accuracy reported is mean@4 at T=0.7 on the demo's training problems: the toy student learns arithmetic facts
per problem, so a few dozen steps cannot move held-out problems measurably; the table says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import yaml

__all__ = ["DemoError", "DemoSettings", "run_demo"]

METHODS: dict[str, dict[str, Any]] = {"brts": {}, "opd": {"teacher_branch": False}}
_LISTENING = re.compile(r"listening on (\S+:\d+)")
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


class DemoError(RuntimeError):
    """A demo step failed; the message names the step and the log to read."""


@dataclass(frozen=True)
class DemoSettings:
    """The demo's budget. Chosen so that BRTS and OPD train for the same steps on the same prompts and the whole demo
    stays under 10 minutes on 2 cores; the student visibly moves at lr 1e-3 within 20 steps of 8 prompts."""

    problems: int = 64
    problem_seed: int = 100
    steps: int = 20
    prompts_per_step: int = 8
    n_candidates: int = 4
    n_tier2: int = 1
    logprob_k: int = 8
    lr: float = 1e-3
    max_new_tokens: int = 24
    eval_n: int = 4
    eval_temperature: float = 0.7
    tails: bool = False  # both branches' losses with a tail bucket (sc_tail, tc_tail; trainer/losses.py)

    def key(self) -> str:
        fields = asdict(self)
        if not fields["tails"]:
            del fields["tails"]  # so demos made before the option existed keep their key (and their folder)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def metric(self) -> str:
        return f"eval/problems/mean@{self.eval_n}"


class DemoPaths:
    """Every file the demo writes, under one folder."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.teacher, self.student = out / "models" / "teacher", out / "models" / "student"
        self.problems = out / "data" / "problems.jsonl"
        self.cache, self.configs, self.runs = out / "cache", out / "configs", out / "runs"
        self.eval_before, self.logs, self.report = out / "eval-before", out / "logs", out / "report"
        self.marker = out / "demo.json"

    def run_dir(self, method: str, seed: int) -> Path:
        return self.runs / f"{method}-seed{seed}"


# --------------------------------------------------------------------------------------------------- steps


def _fit(folder: str, quality: str) -> str:
    """One toy fit in a worker process, on one thread so that two fits share the two cores."""
    import torch
    from transformers.utils import logging as hf_logging

    from brts.toy import fit_toy_model

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # "Writing model shards" bars from two processes would garble the output
    return str(fit_toy_model(folder, quality=quality))


def _prompt_config() -> dict[str, Any]:
    from brts.toy import TOY_CHAT_TEMPLATE

    return {"tokenizer": "qwen2.5-instruct", "chat_template": TOY_CHAT_TEMPLATE, "instruction_suffix": "",
            "max_prompt_len": 256}


def _write_problems(paths: DemoPaths, s: DemoSettings) -> None:
    from brts.toy import make_problems

    paths.problems.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.problems.with_suffix(".tmp")
    unique: dict[str, Any] = {}
    for p in make_problems(4 * s.problems, seed=s.problem_seed):  # distinct problems: a repeat is a free cache hit
        unique.setdefault(p.problem, p)
    with open(tmp, "w", encoding="utf-8") as f:
        for p in list(unique.values())[: s.problems]:
            f.write(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n")
    os.replace(tmp, paths.problems)


def _write_train_configs(paths: DemoPaths, s: DemoSettings) -> dict[str, Path]:
    """The shipped tiny_cpu config with the demo's budget; one file per method, so a user can rerun one by hand."""
    from brts.shared.config import _merge, read_config_file
    from brts.trainer.config import resolve_config

    base = read_config_file(resolve_config("tiny_cpu"))
    demo = {
        "student": str(paths.student), "dataset": str(paths.problems), "max_steps": s.steps,
        "prompts_per_step": s.prompts_per_step, "n_candidates": s.n_candidates, "n_tier2": s.n_tier2,
        "logprob_k": s.logprob_k, "lr": s.lr, "max_response_len": s.max_new_tokens, "save_every": 10,
        "keep_checkpoints": 1, "eval_every": s.steps, "eval_benchmarks": [], "eval_dataset": str(paths.problems),
        "eval_n": s.eval_n, "eval_temperature": s.eval_temperature, "eval_max_new_tokens": s.max_new_tokens,
        "prompt": _prompt_config(), "sampling": {"max_new_tokens": s.max_new_tokens}, "launch": {"nproc": 1},
        "sc_tail": s.tails, "tc_tail": s.tails,
    }
    paths.configs.mkdir(parents=True, exist_ok=True)
    files = {}
    for method, extra in METHODS.items():
        files[method] = paths.configs / f"{method}.yaml"
        files[method].write_text(f"# brts demo: {method}\n" + yaml.safe_dump(_merge(_merge(base, demo), extra),
                                                                             sort_keys=False))
    return files


class _Server:
    """``brts serve`` on loopback with a free port, its output in a log; stopped with SIGTERM."""

    def __init__(self, paths: DemoPaths, s: DemoSettings) -> None:
        self.log = paths.logs / "serve.log"
        self._cmd = [sys.executable, "-m", "brts.cli", "serve", "--model", str(paths.teacher), "--cache",
                     str(paths.cache), "--port", "0", f"sampling.max_new_tokens={s.max_new_tokens}"]
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
                                f"{_last_line(self.log)} (log: {self.log})")
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


def _prewarm(address: str, paths: DemoPaths, s: DemoSettings) -> dict[str, Any]:
    from brts.server.prewarm import prewarm
    from brts.shared.client import TeacherClient
    from brts.shared.config import PrewarmConfig, from_dict

    cfg = from_dict(PrewarmConfig, {"server": address, "dataset": str(paths.problems), "n_tier1": s.n_candidates,
                                    "n_tier2": s.n_tier2, "logprob_k": s.logprob_k, "prompt": _prompt_config()})
    with TeacherClient(address) as client:
        summary = prewarm(cfg, client, progress=True)
    return asdict(summary)


def _eval_before(paths: DemoPaths, s: DemoSettings, seeds: list[int]) -> list[float]:
    """The untrained student on the same problems, with the same per-sample seeds as each run's final evaluation."""
    from brts.shared.config import EvalConfig, from_dict
    from brts.shared.engines import make_engine
    from brts.trainer.evaluate import evaluate

    def config(seed: int) -> Any:
        return from_dict(EvalConfig, {
            "model": str(paths.student), "benchmarks": [], "dataset": str(paths.problems), "n": s.eval_n,
            "temperature": s.eval_temperature, "max_new_tokens": s.max_new_tokens, "engine": "hf",
            "out": str(paths.eval_before / f"seed{seed}"), "seed": seed, "prompt": _prompt_config()})

    key = f"mean@{s.eval_n}"
    values: dict[int, float] = {}
    todo = []
    for seed in seeds:
        done = paths.eval_before / f"seed{seed}" / "summary.json"
        if done.is_file():
            values[seed] = float(json.loads(done.read_text())["benchmarks"]["problems"][key])
        else:
            todo.append(seed)
    if todo:
        engine = make_engine("hf", paths.student, device="cpu", dtype="float32")
        try:
            for seed in todo:
                values[seed] = float(evaluate(config(seed), engine=engine, progress=False)[0].scores[key])
        finally:
            engine.close()
    return [values[seed] for seed in seeds]


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    return fn(*args), time.monotonic() - t0


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def _train_command(paths: DemoPaths, s: DemoSettings, configs: dict[str, Path], method: str, seed: int,
                   address: str) -> list[str] | None:
    """The `brts train` command that finishes this run: None when it is done, a resume when it has a checkpoint
    short of the end, else a fresh start (a folder without checkpoints holds nothing worth keeping)."""
    run_dir = paths.run_dir(method, seed)
    records = _records(run_dir)
    if any(r.get("step") == s.steps and s.metric in r for r in records):
        return None
    train = [sys.executable, "-m", "brts.cli", "train"]
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*")) and \
            (not records or records[-1].get("step", 0) < s.steps):
        return [*train, "--resume", str(run_dir), f"server={address}"]
    shutil.rmtree(run_dir, ignore_errors=True)
    return [*train, "--config", str(configs[method]), f"seed={seed}", f"run_dir={run_dir}", f"server={address}"]


def _train_pair(paths: DemoPaths, s: DemoSettings, configs: dict[str, Path], seed: int, address: str,
                bar: Any, all_runs: list[Path]) -> None:
    """The BRTS and OPD runs of one seed, side by side (one thread each); the bar counts finished steps."""
    procs: list[tuple[str, subprocess.Popen, Path]] = []
    try:
        for method in METHODS:
            cmd = _train_command(paths, s, configs, method, seed, address)
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
            raise DemoError(f"{method} seed {seed}: brts train exited {p.returncode}: {_last_line(log)} (log: {log})")


def _progress(run_dir: Path) -> int:
    """Steps a run has finished (its last metrics line)."""
    return max((int(r.get("step", 0)) for r in _records(run_dir)), default=0)


# --------------------------------------------------------------------------------------------------- the demo


def _check_marker(paths: DemoPaths, s: DemoSettings) -> None:
    if paths.marker.is_file():
        saved = json.loads(paths.marker.read_text())
        if saved.get("settings_key") != s.key():
            raise DemoError(f"--out {paths.out} holds a demo made with other settings ({saved.get('settings')}); "
                            "choose another --out or delete that folder")
    paths.out.mkdir(parents=True, exist_ok=True)
    paths.marker.write_text(json.dumps({"settings_key": s.key(), "settings": asdict(s)}, indent=1) + "\n")


def run_demo(out: str | os.PathLike[str], seeds: int = 3, retrain: bool = False,
             settings: DemoSettings | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or finish) the demo in ``out``; returns the summary (also in ``out/summary.json`` and ``summary.md``)."""
    if seeds < 1:
        raise DemoError(f"seeds: must be >= 1, got {seeds}")
    s = settings or DemoSettings()
    paths = DemoPaths(Path(out).resolve())
    _check_marker(paths, s)
    seed_list = list(range(seeds))
    if retrain:
        for seed in seed_list:
            for method in METHODS:
                shutil.rmtree(paths.run_dir(method, seed), ignore_errors=True)
    paths.logs.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = t0 = time.monotonic()
    say(f"brts demo: [1/5] fitting the toy teacher and the weaker toy student (cached in {paths.out / 'models'})")
    _write_problems(paths, s)
    configs = _write_train_configs(paths, s)
    server = _Server(paths, s)
    address, prewarm, before = _fit_serve_and_eval_before(paths, s, seed_list, server, timings, t0, say)
    try:
        run_dirs = _train_all(paths, s, configs, seed_list, address, timings, say)
    finally:
        server.stop()
    return _write_outputs(paths, s, seeds, run_dirs, before, prewarm, timings, t_all, say)


def _fit_serve_and_eval_before(paths: DemoPaths, s: DemoSettings, seed_list: list[int], server: _Server,
                               timings: dict[str, float], t0: float,
                               say: Callable[[str], None]) -> tuple[str, dict[str, Any], list[float]]:
    """Steps 1-3: both fits side by side, then the server and its prewarm while the untrained student is evaluated.

    Returns (server address, prewarm counts, untrained accuracy per seed); the server is left running for training,
    and stopped here only if these steps fail.
    """
    # The untrained student is evaluated as soon as its fit exists, while the teacher fits and then prewarms: the
    # hf engine's small-batch generation leaves most of a core idle, so the overlap is nearly free.
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool, \
            ThreadPoolExecutor(max_workers=1) as background:
        teacher = pool.submit(_fit, str(paths.teacher), "teacher")
        student = pool.submit(_fit, str(paths.student), "student")
        student.result()
        say(f"brts demo: [2/5] evaluating the untrained student in the background (mean@{s.eval_n}, "
            f"T={s.eval_temperature}, seeds {seed_list}; results in {paths.eval_before})")
        before_future = background.submit(_timed, _eval_before, paths, s, seed_list)
        teacher.result()
        timings["fits (side by side)"] = time.monotonic() - t0
        try:
            t0 = time.monotonic()
            say(f"brts demo: [3/5] starting the teacher server (hf engine, cache {paths.cache}, log {server.log}) "
                f"and prewarming it over the {s.problems} demo problems")
            address = server.start()
            prewarm = _prewarm(address, paths, s)
            timings["server start + prewarm"] = time.monotonic() - t0
            say(f"brts demo:   {address}: {prewarm['cache_hits']}/{prewarm['prompts']} prompts already cached, "
                f"{prewarm['candidates']} candidates, Tier 2 tried on {prewarm['tier2_tried']} "
                f"(rescued {prewarm['tier2_rescued']}), {prewarm['tokens_generated']} tokens generated")
            before, timings["eval before"] = before_future.result()
            say("brts demo:   untrained student: " + ", ".join(f"seed {q} {v:.3f}" for q, v in zip(seed_list, before)))
        except BaseException:
            server.stop()
            raise
    return address, prewarm, before


def _train_all(paths: DemoPaths, s: DemoSettings, configs: dict[str, Path], seed_list: list[int], address: str,
               timings: dict[str, float], say: Callable[[str], None]) -> list[Path]:
    """Step 4: every seed's BRTS and OPD runs against the running server; returns every run's folder."""
    from tqdm import tqdm

    t0 = time.monotonic()
    say(f"brts demo: [4/5] training BRTS and OPD, {s.steps} steps x {s.prompts_per_step} prompts each, "
        f"seeds {seed_list} (logs in {paths.logs})")
    run_dirs = [paths.run_dir(m, q) for m in METHODS for q in seed_list]
    with tqdm(total=s.steps * len(run_dirs), unit="step", desc="train", mininterval=1.0) as bar:
        for seed in seed_list:
            _train_pair(paths, s, configs, seed, address, bar, run_dirs)
        bar.update(bar.total - bar.n)
    timings["training + final evals"] = time.monotonic() - t0
    return run_dirs


def _write_outputs(paths: DemoPaths, s: DemoSettings, seeds: int, run_dirs: list[Path], before: list[float],
                   prewarm: dict[str, Any], timings: dict[str, float], t_all: float,
                   say: Callable[[str], None]) -> dict[str, Any]:
    """Step 5: the report's plots, then the summary table (summary.md, summary.json and the console)."""
    from brts.demo_summary import format_summary, summarize
    from brts.trainer.report import write_report

    seed_list = list(range(seeds))
    t0 = time.monotonic()
    say(f"brts demo: [5/5] writing the report to {paths.report}")
    # the untrained student's evaluation (same problems, same seeds) is every run's step 0 in eval.png
    write_report(run_dirs, paths.report, start_points={
        paths.run_dir(m, q).name: {s.metric: before[q]} for m in METHODS for q in seed_list})
    timings["report"] = time.monotonic() - t0
    timings["total"] = time.monotonic() - t_all
    summary = summarize(before, [_records(paths.run_dir("brts", q)) for q in seed_list],
                        [_records(paths.run_dir("opd", q)) for q in seed_list], s.metric, prewarm, timings)
    table = format_summary(summary)
    caption = (f"Accuracy: {s.metric.split('/')[-1]} at T={s.eval_temperature} on the {s.problems} demo problems (the "
               f"training prompts: a few dozen steps teach this toy student facts per problem, not arithmetic), "
               f"{seeds} seed(s); same budget for both methods: {s.steps} steps x {s.prompts_per_step} prompts, "
               f"1 rollout each; BRTS picks 1 of {s.n_candidates} teacher candidates, Tier 2 on.")
    (paths.out / "summary.md").write_text(f"# brts demo\n\n{caption}\n\n{table}\n")
    (paths.out / "summary.json").write_text(json.dumps({**summary.as_dict(), "settings": asdict(s), "seeds": seeds},
                                                       indent=1) + "\n")
    say("")
    say(caption)
    say(table)
    say(f"\nbrts demo: outputs in {paths.out}: summary.md, report/ (plots), runs/ (metrics, checkpoints), "
        f"eval-before/, logs/; the teacher's cache in cache/ (run again: everything is reused; --retrain trains again)")
    return summary.as_dict()
