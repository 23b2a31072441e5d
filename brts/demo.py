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

Two rows of accuracy (issue #25), mean@4 at T=0.7 over the same seeds: the training problems (what the runs
trained on: memorising per-problem facts moves it) and held-out problems of the same generator that no run ever
sees (disjoint by text, fixed by ``problem_seed``): only what generalises moves that one. The settings that decide
the task (operand range, the fits' response styles, the student's fit) are ``DemoSettings`` fields, so a variant of
the task is a variant of the settings (``bench/demo_variants.py`` runs the ones tried).

``--teachers 2`` (issue #27) adds a second toy teacher, stronger and answering in another style, on its own server
and cache, and a third method: BRTS choosing among both teachers' candidates (``candidate_teachers``), so the table
can say which teacher the rule chose how often, and where.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import yaml

from brts.demo_runs import (
    POOL_METHOD,
    SECOND,
    DemoError,
    Server,
    eval_before,
    methods,
    prewarm_demo,
    prompt_config,
    records,
    train_pair,
)

__all__ = ["DemoError", "DemoPaths", "DemoSettings", "run_demo"]

TRAIN_SET, HELD_OUT_SET = "problems", "held_out"  # the evaluation sets' names (their files' stems)
SECOND_QUALITY = "second-teacher"  # brts.toy.QUALITIES: the second teacher of ``--teachers 2``


@dataclass(frozen=True)
class DemoSettings:
    """The demo's budget and task. Chosen so that BRTS and OPD train for the same steps on the same prompts and the
    whole demo stays under 10 minutes on 2 cores. 160 training problems asked once each (20 steps of 8) at lr 3e-4:
    of the variants tried for issue #25 (``brts/demo_tasks.py``), the one where held-out accuracy moved; 64 problems
    seen 2.5 times each at lr 1e-3 (the demo before) only moved the training problems (memorised facts).

    ``teacher_fit``/``student_fit`` override the toy fit settings of the two qualities (``brts.toy.QUALITIES``:
    e.g. ``{"styles": ["work", "answer", "boxed"]}``, or a student fitted further); ``max_operand`` is the task's
    range for the problems and both fits."""

    problems: int = 160
    held_out: int = 64  # problems never trained on (0: no held-out row)
    problem_seed: int = 100
    max_operand: int = 20
    teacher_fit: dict[str, Any] = field(default_factory=dict)
    student_fit: dict[str, Any] = field(default_factory=dict)
    steps: int = 20
    prompts_per_step: int = 8
    n_candidates: int = 4
    n_tier2: int = 1
    logprob_k: int = 8
    lr: float = 3e-4
    max_new_tokens: int = 24
    eval_n: int = 4
    eval_temperature: float = 0.7
    tails: bool = False  # both branches' losses with a tail bucket (sc_tail, tc_tail; trainer/losses.py)
    # 2: a second toy teacher of another strength and style (brts.toy.QUALITIES["second-teacher"], with
    # ``second_fit`` overriding it) and a third method, BRTS with the cross-teacher pool (issue #27)
    teachers: int = 1
    second_fit: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("problems", "steps", "prompts_per_step", "n_candidates", "eval_n", "max_operand"):
            if getattr(self, name) < 1:
                raise DemoError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.held_out < 0:
            raise DemoError(f"held_out: must be >= 0, got {self.held_out}")
        if self.teachers not in (1, 2):
            raise DemoError(f"teachers: must be 1 or 2, got {self.teachers}")
        from brts.toy_task import task_size

        space = task_size(self.max_operand)
        if self.problems + self.held_out > space:
            raise DemoError(f"problems + held_out: {self.problems + self.held_out} distinct problems asked of a task "
                            f"with {space} (max_operand {self.max_operand}); ask for fewer")

    def key(self) -> str:
        fields = asdict(self)
        if self.teachers == 1:  # so one-teacher demos made before --teachers existed keep their folder key
            del fields["teachers"], fields["second_fit"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def metric(self) -> str:
        """The training problems' accuracy key in a run's metrics lines."""
        return f"eval/{TRAIN_SET}/mean@{self.eval_n}"

    @property
    def metrics(self) -> list[str]:
        """Every evaluation set's accuracy key (the training problems first)."""
        return [f"eval/{name}/mean@{self.eval_n}" for name in ([TRAIN_SET, HELD_OUT_SET] if self.held_out else
                                                                [TRAIN_SET])]

    def fit_overrides(self, quality: str) -> dict[str, Any]:
        own = {"teacher": self.teacher_fit, "student": self.student_fit, SECOND_QUALITY: self.second_fit}[quality]
        return {"max_operand": self.max_operand, **own}


class DemoPaths:
    """Every file the demo writes, under one folder."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.teacher, self.student = out / "models" / "teacher", out / "models" / "student"
        self.second_teacher, self.second_cache = out / "models" / SECOND_QUALITY, out / f"cache-{SECOND_QUALITY}"
        self.problems = out / "data" / f"{TRAIN_SET}.jsonl"
        self.held_out = out / "data" / f"{HELD_OUT_SET}.jsonl"
        self.cache, self.configs, self.runs = out / "cache", out / "configs", out / "runs"
        self.eval_before, self.logs, self.report = out / "eval-before", out / "logs", out / "report"
        self.marker = out / "demo.json"

    def run_dir(self, method: str, seed: int) -> Path:
        return self.runs / f"{method}-seed{seed}"

    def eval_files(self, s: DemoSettings) -> list[Path]:
        return [self.problems, self.held_out] if s.held_out else [self.problems]

    def eval_names(self, s: DemoSettings) -> list[str]:
        return [p.stem for p in self.eval_files(s)]


# --------------------------------------------------------------------------------------------------- steps


def _fit(folder: str, quality: str, overrides: dict[str, Any]) -> str:
    """One toy fit in a worker process, on one thread so that two fits share the two cores."""
    import torch
    from transformers.utils import logging as hf_logging

    from brts.toy import fit_toy_model

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # "Writing model shards" bars from two processes would garble the output
    return str(fit_toy_model(folder, quality=quality, **overrides))


def _write_problems(paths: DemoPaths, s: DemoSettings) -> None:
    """The training problems and the held-out ones: distinct texts within each (a repeat is a free cache hit) and
    disjoint between them, each drawn by its own seed of the same generator."""
    from brts.toy_task import make_problems, task_size

    paths.problems.parent.mkdir(parents=True, exist_ok=True)
    space = task_size(s.max_operand)
    taken: set[str] = set()
    for path, count, seed in ((paths.problems, s.problems, s.problem_seed),
                              (paths.held_out, s.held_out, s.problem_seed + 1)):
        if count == 0:
            continue
        chosen = {}
        for p in make_problems(8 * space, seed=seed, max_operand=s.max_operand):
            if p.problem not in taken and p.problem not in chosen:
                chosen[p.problem] = p
                if len(chosen) == count:
                    break
        taken |= set(chosen)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for p in chosen.values():
                f.write(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n")
        os.replace(tmp, path)


def _write_train_configs(paths: DemoPaths, s: DemoSettings) -> dict[str, Path]:
    """The shipped tiny_cpu config with the demo's budget; one file per method, so a user can rerun one by hand."""
    from brts.shared.config import _merge, read_config_file
    from brts.trainer.config import resolve_config

    base = read_config_file(resolve_config("tiny_cpu"))
    demo = {
        "student": str(paths.student), "dataset": str(paths.problems), "max_steps": s.steps,
        "prompts_per_step": s.prompts_per_step, "n_candidates": s.n_candidates, "n_tier2": s.n_tier2,
        "logprob_k": s.logprob_k, "lr": s.lr, "max_response_len": s.max_new_tokens, "save_every": 10,
        "keep_checkpoints": 1, "eval_every": s.steps, "eval_benchmarks": [],
        "eval_dataset": [str(p) for p in paths.eval_files(s)], "eval_n": s.eval_n,
        "eval_temperature": s.eval_temperature, "eval_max_new_tokens": s.max_new_tokens, "prompt": prompt_config(),
        "sampling": {"max_new_tokens": s.max_new_tokens}, "launch": {"nproc": 1}, "sc_tail": s.tails,
        "tc_tail": s.tails,
    }
    paths.configs.mkdir(parents=True, exist_ok=True)
    files = {}
    for method, extra in methods(s).items():
        config = _merge(_merge(base, demo), extra)
        if "teachers" in extra:
            del config["server"]  # `server` is the one-teacher shorthand; both are refused
        files[method] = paths.configs / f"{method}.yaml"
        files[method].write_text(f"# brts demo: {method}\n" + yaml.safe_dump(config, sort_keys=False))
    return files


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    return fn(*args), time.monotonic() - t0


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
            for method in methods(s):
                shutil.rmtree(paths.run_dir(method, seed), ignore_errors=True)
    paths.logs.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = t0 = time.monotonic()
    say(f"brts demo: [1/5] fitting the toy teacher{'s' if s.teachers == 2 else ''} and the weaker toy student "
        f"(cached in {paths.out / 'models'})")
    _write_problems(paths, s)
    configs = _write_train_configs(paths, s)
    servers = {"default": Server(paths.teacher, paths.cache, paths.logs / "serve.log", s)}
    if s.teachers == 2:
        servers[SECOND] = Server(paths.second_teacher, paths.second_cache, paths.logs / f"serve-{SECOND}.log", s)
    addresses, prewarms, before = _fit_serve_and_eval_before(paths, s, seed_list, servers, timings, t0, say)
    try:
        run_dirs = _train_all(paths, s, configs, seed_list, addresses, timings, say)
    finally:
        _stop(servers)
    return _write_outputs(paths, s, seeds, run_dirs, before, prewarms, timings, t_all, say)


def _stop(servers: dict[str, Server]) -> None:
    for server in servers.values():
        server.stop()


def _fit_serve_and_eval_before(paths: DemoPaths, s: DemoSettings, seed_list: list[int], servers: dict[str, Server],
                               timings: dict[str, float], t0: float, say: Callable[[str], None],
                               ) -> tuple[dict[str, str], dict[str, dict[str, Any]], dict[str, list[float]]]:
    """Steps 1-3: the fits side by side, then the servers and their prewarm while the untrained student is evaluated.

    Returns (server address and prewarm counts per teacher name, untrained accuracy per set and seed); the servers
    are left running for training, and stopped here only if these steps fail.
    """
    # The untrained student is evaluated as soon as its fit exists, while the teacher fits and then prewarms: the
    # hf engine's small-batch generation leaves most of a core idle, so the overlap is nearly free.
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool, \
            ThreadPoolExecutor(max_workers=1) as background:
        fits = [pool.submit(_fit, str(paths.teacher), "teacher", s.fit_overrides("teacher"))]
        student = pool.submit(_fit, str(paths.student), "student", s.fit_overrides("student"))
        if s.teachers == 2:
            fits.append(pool.submit(_fit, str(paths.second_teacher), SECOND_QUALITY, s.fit_overrides(SECOND_QUALITY)))
        student.result()
        say(f"brts demo: [2/5] evaluating the untrained student in the background (mean@{s.eval_n}, "
            f"T={s.eval_temperature}, seeds {seed_list}, sets {', '.join(paths.eval_names(s))}; results in "
            f"{paths.eval_before})")
        before_future = background.submit(_timed, eval_before, paths, s, seed_list)
        for fit in fits:
            fit.result()
        timings["fits (side by side)"] = time.monotonic() - t0
        try:
            t0 = time.monotonic()
            addresses, prewarms = _serve_and_prewarm(paths, s, servers, say)
            timings["servers start + prewarm" if s.teachers == 2 else "server start + prewarm"] = time.monotonic() - t0
            before, timings["eval before"] = before_future.result()
            for name, values in before.items():
                say(f"brts demo:   untrained student, {name}: "
                    + ", ".join(f"seed {q} {v:.3f}" for q, v in zip(seed_list, values)))
        except BaseException:
            _stop(servers)
            raise
    return addresses, prewarms, before


def _serve_and_prewarm(paths: DemoPaths, s: DemoSettings, servers: dict[str, Server],
                       say: Callable[[str], None]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Start each teacher's server and prewarm it with what training will ask of it: the routed teacher
    (``default``) its windows with Tier 2, the pool's second teacher its Tier-1 windows only."""
    addresses, prewarms = {}, {}
    for name, server in servers.items():
        which = "teacher's server" if name == "default" else "second teacher's server"
        what = "" if name == "default" else " (its Tier-1 windows: the pool draws Tier 2 from the first teacher)"
        say(f"brts demo: [3/5] starting the {which} (hf engine, cache {server.cache}, log {server.log}) "
            f"and prewarming it over the {s.problems} training problems{what}")
        addresses[name] = server.start()
        p = prewarms[name] = prewarm_demo(addresses[name], paths, s, tier2=name == "default")
        say(f"brts demo:   {addresses[name]}: {p['cache_hits']}/{p['prompts']} prompts already cached, "
            f"{p['candidates']} candidates, Tier 2 tried on {p['tier2_tried']} (rescued {p['tier2_rescued']}), "
            f"{p['tokens_generated']} tokens generated")
    return addresses, prewarms


def _train_all(paths: DemoPaths, s: DemoSettings, configs: dict[str, Path], seed_list: list[int],
               addresses: dict[str, str], timings: dict[str, float], say: Callable[[str], None]) -> list[Path]:
    """Step 4: every seed's runs of every method against the running servers; returns every run's folder."""
    from tqdm import tqdm

    t0 = time.monotonic()
    say(f"brts demo: [4/5] training {', '.join(methods(s))}, {s.steps} steps x {s.prompts_per_step} prompts each, "
        f"seeds {seed_list} (logs in {paths.logs})")
    run_dirs = [paths.run_dir(m, q) for m in methods(s) for q in seed_list]
    with tqdm(total=s.steps * len(run_dirs), unit="step", desc="train", mininterval=1.0) as bar:
        for seed in seed_list:
            train_pair(paths, s, configs, seed, addresses, bar, run_dirs)
        bar.update(bar.total - bar.n)
    timings["training + final evals"] = time.monotonic() - t0
    return run_dirs


def _caption(s: DemoSettings, seeds: int) -> str:
    rows = (f"the {s.problems} training problems (the runs' prompts: memorising per-problem facts moves this row)"
            + (f" and {s.held_out} held-out problems (same generator, never trained on: only what generalises moves "
               "this row)" if s.held_out else ""))
    caption = (f"Accuracy: mean@{s.eval_n} at T={s.eval_temperature} on {rows}, {seeds} seed(s); same budget for "
               f"every method: {s.steps} steps x {s.prompts_per_step} prompts, 1 rollout each; BRTS picks 1 of "
               f"{s.n_candidates} teacher candidates, Tier 2 on.")
    if s.teachers == 2:
        caption += (f" The pool (`candidate_teachers: [default, {SECOND}]`) picks 1 of 2 x {s.n_candidates}: "
                    f"`default` is {_describe(s, 'teacher')}, `{SECOND}` {_describe(s, SECOND_QUALITY)}; Tier 2 is "
                    f"drawn from `default` (every prompt's routed teacher) only when all {2 * s.n_candidates} are "
                    "wrong.")
    return caption


def _describe(s: DemoSettings, quality: str) -> str:
    """A fit in words: its answer style(s) and the exact-match rate its fit stopped at."""
    from brts.toy import QUALITIES, STYLES

    fit = replace(QUALITIES[quality], **s.fit_overrides(quality))
    forms = " / ".join(f"'{STYLES[x].format(a=3, op='+', b=4, c=7)}'" for x in fit.styles)
    who = "teacher" if quality == "teacher" else "second teacher"
    return f"the toy {who} ({forms}, fitted to {fit.target_accuracy:.0%} exact match)"


def _write_outputs(paths: DemoPaths, s: DemoSettings, seeds: int, run_dirs: list[Path],
                   before: dict[str, list[float]], prewarms: dict[str, dict[str, Any]], timings: dict[str, float],
                   t_all: float, say: Callable[[str], None]) -> dict[str, Any]:
    """Step 5: the report's plots, then the summary table (summary.md, summary.json and the console)."""
    from brts.demo_summary import format_summary, summarize
    from brts.trainer.report import write_report

    seed_list = list(range(seeds))
    t0 = time.monotonic()
    say(f"brts demo: [5/5] writing the report to {paths.report}")
    # the untrained student's evaluation (same problems, same seeds) is every run's step 0 in eval.png
    write_report(run_dirs, paths.report, start_points={
        paths.run_dir(m, q).name: {f"eval/{name}/mean@{s.eval_n}": values[q] for name, values in before.items()}
        for m in methods(s) for q in seed_list})
    timings["report"] = time.monotonic() - t0
    timings["total"] = time.monotonic() - t_all
    runs = {m: [records(paths.run_dir(m, q)) for q in seed_list] for m in methods(s)}
    summary = summarize(before, runs["brts"], runs["opd"], s.eval_n, prewarms["default"], timings,
                        pool_runs=runs.get(POOL_METHOD, ()), second_prewarm=prewarms.get(SECOND))
    table = format_summary(summary)
    caption = _caption(s, seeds)
    (paths.out / "summary.md").write_text(f"# brts demo\n\n{caption}\n\n{table}\n")
    (paths.out / "summary.json").write_text(json.dumps({**summary.as_dict(), "settings": asdict(s), "seeds": seeds},
                                                       indent=1) + "\n")
    say("")
    say(caption)
    say(table)
    caches = (f"the teachers' caches in cache/ and {paths.second_cache.name}/" if s.teachers == 2 else
              "the teacher's cache in cache/")
    say(f"\nbrts demo: outputs in {paths.out}: summary.md, report/ (plots), runs/ (metrics, checkpoints), "
        f"eval-before/, logs/; {caches} (run again: everything is reused; --retrain trains again)")
    return summary.as_dict()
