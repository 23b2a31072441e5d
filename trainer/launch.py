"""``brts train``: check everything that can be checked in one process, then start the ranks with torchrun.

Why check here: a malformed config, a server that is down, a tokenizer that differs from the teacher's, a run
directory that already holds a run — each is found in about a second, before N ranks load models, and ends with
one line and exit 1. Then the resolved config is written to ``RUN_DIR/config.yaml`` (the ranks read that file, and
it documents the run), and ``python -m torch.distributed.run --standalone`` starts ``brts.trainer.main``. A failure
the ranks can explain comes back through a status file as one line and its exit code (3: the teacher went away
mid-run, a checkpoint was written).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

from brts.shared.config import ConfigError

__all__ = ["launch"]


def _say(message: str) -> None:
    print(f"brts train: {message}", file=sys.stderr, flush=True)


def _write_config(config: Any, launch_spec: Any, path: Path) -> None:
    data = config.to_dict()
    data["betas"] = list(data["betas"])
    data["launch"] = launch_spec.to_dict() if hasattr(launch_spec, "to_dict") else dict(launch_spec.__dict__)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def launch(config_file: str | None, overrides: Sequence[str], resume: str | None = None) -> int:
    """The whole ``brts train``: returns the exit code."""
    from brts.trainer.checkpoint import RESUME_MUTABLE_KEYS, config_diff, list_checkpoints, read_meta
    from brts.trainer.config import load_train_config
    from brts.trainer.main import STATUS_ENV, TEACHER_ENV
    from brts.trainer.preflight import PreflightError, preflight

    try:
        if resume is not None and config_file is None:
            saved = Path(resume) / "config.yaml"
            if not saved.is_file():
                saved = Path(read_meta(resume)["path"]).parents[1] / "config.yaml"
            config_file = str(saved)
        config, spec = load_train_config(config_file, overrides)
        preflight(config, spec)
        rendezvous = _rendezvous()
    except (ConfigError, PreflightError, FileNotFoundError) as exc:
        _say(str(exc))
        return 1
    meta: dict[str, Any] | None = None
    if resume is not None:
        try:
            meta = read_meta(resume)
        except FileNotFoundError as exc:
            _say(str(exc))
            return 1
        diff = config_diff(meta.get("config") or config.to_dict(), config.to_dict())
        if diff:  # said here, before RUN_DIR/config.yaml is rewritten, so the saved config stays the resumable one
            lines = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
            _say(f"checkpoint {meta['path']} was saved with a different config: {lines}. Resume with the saved "
                 f"config (only {', '.join(RESUME_MUTABLE_KEYS)} may change) or start a new run")
            return 1
    if resume is None and list_checkpoints(config.run_dir):
        _say(f"run_dir {config.run_dir} already holds checkpoints: resume it with `brts train --resume "
             f"{config.run_dir}` or choose another run_dir")
        return 1
    try:
        fingerprints = _check_teachers(config, meta)
    except (ValueError, OSError, RuntimeError) as exc:  # StartupError, RoutingError, a data file's error
        _say(str(exc))
        return 1
    run_dir = Path(config.run_dir)
    config_path = run_dir / "config.yaml"
    _write_config(config, spec, config_path)
    device = spec.device if spec.device != "auto" else ("cuda" if _has_gpu() else "cpu")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env[TEACHER_ENV] = json.dumps(fingerprints)
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // spec.nproc))
    with tempfile.TemporaryDirectory(prefix="brts-train-") as tmp:
        status = Path(tmp) / "status.json"
        env[STATUS_ENV] = str(status)
        cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={spec.nproc}",
               "-m", "brts.trainer.main", "--config", str(config_path)]
        if resume is not None:
            cmd += ["--resume", resume]
        code = _run_forwarding_signals(cmd, env)
        if status.is_file():
            result = json.loads(status.read_text(encoding="utf-8"))
            if result["code"]:
                _say(result["message"])
                return int(result["code"])
            return 0  # rank 0 finished (or checkpointed after a SIGTERM) and said so itself
    if code:
        _say(f"a rank failed (torchrun exit {code}); the error is above. Resume with `brts train --resume {run_dir}`")
        return code or 1
    return 0


def _check_teachers(config: Any, meta: dict[str, Any] | None) -> dict[str, str]:
    """Every prompt has a teacher; every teacher passes its start-up checks (one line each, printed); a resume is
    against the teachers its checkpoint trained with. Returns each teacher's fingerprint (for the ranks)."""
    from brts.shared.data import load_dataset
    from brts.trainer.checkpoint import saved_teachers, teacher_set_change
    from brts.trainer.routing import check_routes
    from brts.trainer.step_prompts import first_steps_requests, prompt_spec_of
    from brts.trainer.teacher_link import HIT_SAMPLE_STEPS, StartupError, check_server

    problems = load_dataset(config.dataset, config.teacher_route)
    routed = check_routes(problems, config.teacher_entries(), config.teacher_route)
    first = first_steps_requests(config, problems, prompt_spec_of(config), HIT_SAMPLE_STEPS) \
        if config.teacher_branch else {}
    reports = check_server(config, first)
    for report in reports:
        print(f"brts train: {report.line()}", flush=True)
    if len(reports) > 1:
        print("brts train: prompts per teacher: " + ", ".join(f"{n} {routed[n]}" for n in sorted(routed)), flush=True)
    fingerprints = {r.name: r.teacher_fingerprint for r in reports}
    change = teacher_set_change(saved_teachers(meta.get("train_state", {})), fingerprints) if meta else None
    if change:
        raise StartupError(change)
    return fingerprints


def _rendezvous() -> list[str]:
    """One node: ``--standalone``. Several: the usual variables, set the same on every node (NNODES, NODE_RANK,
    MASTER_ADDR, MASTER_PORT), and ``brts train`` run on each (the run_dir on a shared file system)."""
    nnodes = int(os.environ.get("NNODES", "1"))
    if nnodes <= 1:
        return ["--standalone"]
    missing = [v for v in ("NODE_RANK", "MASTER_ADDR") if v not in os.environ]
    if missing:
        raise ConfigError(f"NNODES={nnodes}: also set {', '.join(missing)} (and MASTER_PORT) on every node")
    return [f"--nnodes={nnodes}", f"--node_rank={os.environ['NODE_RANK']}",
            f"--master_addr={os.environ['MASTER_ADDR']}", f"--master_port={os.environ.get('MASTER_PORT', '29500')}"]


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun and wait for it. A SIGTERM to this process is passed on (torchrun hands it to the ranks,
    which checkpoint and exit), so killing the launcher never orphans running ranks. Ctrl-C reaches torchrun
    from the terminal itself; here it only must not end the wait early."""
    proc = subprocess.Popen(cmd, env=env)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _has_gpu() -> bool:
    from brts.trainer.preflight import Machine

    return Machine().gpu_count() > 0
