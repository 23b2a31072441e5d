"""Sharded training checkpoints (DCP) that resume exactly: the on-disk format, save, load and the resolver.

Layout of a run directory::

    RUN_DIR/checkpoints/
        latest                   text: the name of the newest checkpoint ("step_000040"), replaced atomically
        step_000040/
            dcp/                 torch.distributed.checkpoint: {"model": ..., "optim": ...}, one file per rank
            rng/rank_00000.pt    each rank's RNG states (torch CPU, cuda, python ``random``, numpy)
            meta.json            step, world size, the config dict, the train state (the teacher's fingerprint)
            COMPLETE             written last: a directory without it is not a checkpoint
        .tmp-step_000060/        a save in progress (or one that crashed): never resolved, removed by the next save

Atomicity: every rank writes into ``.tmp-step_N``; after a barrier rank 0 writes ``meta.json`` and ``COMPLETE``
(fsynced), renames the directory to ``step_N`` and then replaces ``latest``. A crash at any point leaves either the
previous checkpoint as ``latest`` or the new one complete. All ranks must see the same file system (one node, or a
shared one across nodes).

Exact resume: model and optimizer states go through DCP (bit-exact fp32) and each rank restores its own RNG
states. The prompt sampler needs no state (its draws are pure in (seed, step)), so ``train_state`` only carries
what the loop checks on resume (the teacher's fingerprint); it must be JSON-able and the same on every rank
(rank 0's is stored). At a different world size DCP reshards the model and optimizer; the per-rank RNG states
cannot be mapped and are left alone (a warning says so).

Every command that takes a checkpoint (``--resume``, ``brts train export``) goes through ``resolve_checkpoint``:
a run directory, its ``checkpoints`` directory, the ``latest`` file in it (what a finished run prints) or one
``step_N``. The training loop does not call these functions itself: ``CheckpointManager``
(``checkpoint_manager.py``) owns when to save, the SIGTERM stop and the resume. Used directly::

    step, train_state = 0, {"teacher": fingerprint}
    if resume:
        step, train_state = load_checkpoint(resume, wrapper, optimizer, config_dict=cfg.to_dict())
    while step < cfg.max_steps:
        updater.step(...); step += 1
        if cfg.save_every and step % cfg.save_every == 0:   # collective: every rank calls it
            save_checkpoint(cfg.run_dir, step, wrapper, optimizer, train_state, cfg.to_dict(),
                            keep_last=cfg.keep_checkpoints or None)
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from brts.shared.config import DEFAULT_TEACHER

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
META = "meta.json"
DCP_DIR = "dcp"
RNG_DIR = "rng"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1

# Config keys that may legitimately change when a run is resumed (dotted paths of the config dict; a key covers
# its whole section): how long to run, how often to save/evaluate/log, where the run lives, the teacher server's
# address and how it is reached, also per teacher (``teachers.*.address``: the teacher and its cache are the same,
# only where it listens moved; a changed set of teachers is refused by their fingerprints) and a ``launch`` section
# if the caller includes one (ranks, device: DCP reshards to a new world size). Everything else (model, data, optimizer,
# algorithm, dtype, token budget, seeds...) must match, or ``load_checkpoint`` raises.
RESUME_MUTABLE_KEYS: tuple[str, ...] = ("max_steps", "save_every", "eval_every", "log_every", "run_dir", "server",
                                        "launch", "keep_checkpoints", "server_token_file", "server_tls_ca",
                                        "server_retries", "wandb_project", "eval_benchmarks", "eval_n",
                                        "eval_temperature", "eval_top_p", "eval_max_new_tokens", "eval_limit",
                                        "eval_dataset", "eval_at_start", "teacher_agreement_tolerance",
                                        "teachers.*.address", "teachers.*.tls_ca", "teachers.*.token_file",
                                        "teachers.*.retries")


# --------------------------------------------------------------------------------------------------- helpers


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _barrier() -> None:
    if _dist():
        dist.barrier()


@contextlib.contextmanager
def single_process_ok() -> Iterator[None]:
    """Silence DCP's "assuming the intent is to save/load in a single process": without a group, it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and ``os.replace`` (readers never see half)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON (tuples become lists), failing early with the offending value."""
    return json.loads(json.dumps(obj, allow_nan=True))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any],
                ignore: Iterable[str] = RESUME_MUTABLE_KEYS) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, current value)}`` for every key that differs (missing on one side = ``None``
    there), except the ``ignore`` keys (a key also ignores everything under it)."""
    a, b = _flatten(_jsonable(dict(saved))), _flatten(_jsonable(dict(current)))
    skip = tuple(ignore)
    diff = {}
    for key in sorted(set(a) | set(b)):
        if any(fnmatch.fnmatchcase(key, s) or fnmatch.fnmatchcase(key, f"{s}.*") for s in skip):
            continue
        if a.get(key) != b.get(key):  # a setting newer than the checkpoint reads None there: unset, not changed
            diff[key] = (a.get(key), b.get(key))
    return diff


def saved_teachers(train_state: Mapping[str, Any]) -> dict[str, str]:
    """A checkpoint's teacher fingerprints by name; one saved before several teachers has one, named "default"."""
    if "teachers" in train_state:
        return {str(k): str(v) for k, v in train_state["teachers"].items()}
    return {DEFAULT_TEACHER: str(train_state["teacher"])} if train_state.get("teacher") else {}


def teacher_set_change(saved: Mapping[str, str], now: Mapping[str, str]) -> str | None:
    """Why a resume against the teachers ``now`` would not continue the run ``saved`` trained against (a name added
    or gone, a name that serves another teacher), as one line; None when they are the same (or nothing was saved).
    Their cached candidates and scores would not be the ones the checkpoint trained on."""
    if not saved or not now or dict(saved) == dict(now):
        return None

    def named(fps: Mapping[str, str]) -> str:
        return ", ".join(f"{name}={fp[:12]}" for name, fp in sorted(fps.items()))

    return (f"the checkpoint was trained against teachers {named(saved)}, now they are {named(now)}: resume against "
            "the same teachers (a teacher may move to another address, not change or come and go)")


# --------------------------------------------------------------------------------------------------- RNG


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's (one device per rank)
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------------------- save / load


def _model_optim_state(wrapper: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` as DCP wants them (sharded: DTensors under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(wrapper)}
    msd, osd = get_state_dict(wrapper, optimizer)
    return {"model": msd, "optim": osd}


def save_checkpoint(run_dir: str | os.PathLike, step: int, wrapper: nn.Module, optimizer: torch.optim.Optimizer | None,
                    train_state: Mapping[str, Any] | None = None, config_dict: Mapping[str, Any] | None = None,
                    keep_last: int | None = None) -> Path:
    """Collective (every rank calls it): write ``run_dir/checkpoints/step_{step:06d}`` and point ``latest`` at it.

    ``train_state`` (JSON-able, rank 0's is kept) and ``config_dict`` land in ``meta.json``; ``keep_last`` N > 0
    deletes all but the newest N complete checkpoints afterwards (``latest``'s is always kept). Returns the path.
    """
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / CHECKPOINTS
    name = checkpoint_name(step)
    final, tmp = root / name, root / f"{TMP_PREFIX}{name}"
    meta = {"format_version": FORMAT_VERSION, "step": int(step), "world_size": _world(),
            "train_state": _jsonable(dict(train_state or {})), "config": _jsonable(dict(config_dict or {})),
            "torch_version": torch.__version__}
    # An optimizer that never stepped has no state; get_state_dict would create it with a zero-lr step (AdamW's
    # step count becomes 1), which changes the run. Save the model alone then; loading leaves the optimizer fresh.
    if optimizer is not None and not optimizer.state:
        optimizer = None
    meta["optimizer"] = optimizer is not None
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):  # this save's leftovers or a crashed save's
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / RNG_DIR).mkdir(parents=True)
    _barrier()
    t0 = time.monotonic()
    with single_process_ok():
        dcp.save(_model_optim_state(wrapper, optimizer), checkpoint_id=str(tmp / DCP_DIR), no_dist=not _dist())
    rng_path = tmp / RNG_DIR / f"rank_{rank:05d}.pt"
    torch.save(_rng_state(), rng_path)
    with open(rng_path, "rb") as f:
        os.fsync(f.fileno())
    _barrier()  # every rank's shards and RNG states are on disk
    if rank == 0:
        meta["save_seconds"] = round(time.monotonic() - t0, 3)
        _write_atomic(tmp / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _write_atomic(tmp / COMPLETE, f"{name}\n")
        old = None
        if final.exists():  # the same step saved again (e.g. after resuming from an earlier one)
            old = root / f"{TMP_PREFIX}old-{name}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / LATEST, f"{name}\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if keep_last:
            for path in list_checkpoints(root)[:-keep_last]:
                if path != final:
                    shutil.rmtree(path, ignore_errors=True)
    _barrier()
    return final


def is_complete(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / COMPLETE).is_file() and (p / META).is_file()


def list_checkpoints(path: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under a run directory or its ``checkpoints`` directory, oldest step first."""
    root = Path(path)
    if (root / CHECKPOINTS).is_dir():
        root = root / CHECKPOINTS
    found = []
    for p in root.glob("step_*") if root.is_dir() else []:
        if p.is_dir() and is_complete(p) and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, a run directory, its ``checkpoints`` directory or the ``latest`` file in it → one
    complete checkpoint. The one resolver of ``--resume`` and ``brts train export``, so both take the path a
    finished run prints (``RUN_DIR/checkpoints/latest``).

    Anything but a checkpoint directory: the checkpoint ``latest`` names, or (``latest`` missing, or naming an
    incomplete one) the complete checkpoint with the highest step. Raises ``FileNotFoundError`` saying what was
    looked at.
    """
    p = Path(path)
    if p.name == LATEST and p.is_file():  # RUN_DIR/checkpoints/latest, as a finished run prints it
        p = p.parent
    if (p / COMPLETE).exists() or (p / META).exists() or p.name.startswith("step_"):
        if not is_complete(p):
            raise FileNotFoundError(f"checkpoint {p}: incomplete (no {COMPLETE} marker; the save was interrupted)")
        return p
    root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
    latest = root / LATEST
    if latest.is_file():
        target = root / latest.read_text(encoding="utf-8").strip()
        if is_complete(target):
            return target
        warnings.warn(f"{latest} names {target.name}, which is not a complete checkpoint; using the newest one",
                      stacklevel=2)
    found = list_checkpoints(root)
    if not found:
        raise FileNotFoundError(f"{p}: no complete checkpoint (looked for {root}/{LATEST} and {root}/step_*)")
    return found[-1]


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of the checkpoint ``path`` resolves to, plus ``"path"``."""
    ckpt = resolve_checkpoint(path)
    meta = json.loads((ckpt / META).read_text(encoding="utf-8"))
    meta["path"] = str(ckpt)
    return meta


def load_checkpoint(path: str | os.PathLike, wrapper: nn.Module, optimizer: torch.optim.Optimizer | None,
                    config_dict: Mapping[str, Any] | None = None,
                    ignore_keys: Iterable[str] = RESUME_MUTABLE_KEYS) -> tuple[int, dict[str, Any]]:
    """Collective: restore model, optimizer and (same world size only) RNG states; returns ``(step, train_state)``.

    ``path`` is a checkpoint, a run directory or its ``checkpoints`` directory (``latest`` is followed). With
    ``config_dict``, a saved config that differs outside ``ignore_keys`` (``RESUME_MUTABLE_KEYS``) raises
    ``ValueError`` listing every differing key, before anything is loaded. A different world size works (DCP
    reshards) with a warning that the RNG states were not restored. ``optimizer=None`` loads the model only.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    ignore_keys = tuple(ignore_keys)
    meta = read_meta(path)
    ckpt = Path(meta["path"])
    if config_dict is not None and not meta.get("config"):
        warnings.warn(f"checkpoint {ckpt} has no saved config: nothing to compare the current one with", stacklevel=2)
    elif config_dict is not None:
        diff = config_diff(meta["config"], config_dict, ignore_keys)
        if diff:
            lines = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"checkpoint {ckpt} was saved with a different config ({len(diff)} key"
                             f"{'s' if len(diff) != 1 else ''}: {', '.join(diff)}): {lines}. Resume with the saved "
                             f"config (only {', '.join(ignore_keys)} may change) or start a new run.")
    if not meta.get("optimizer", True):
        optimizer = None  # saved before the first step: nothing to restore, the optimizer stays fresh
    state = _model_optim_state(wrapper, optimizer)
    with single_process_ok():
        dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR), no_dist=not _dist())
    if optimizer is None:
        set_model_state_dict(wrapper, state["model"])
    else:
        set_state_dict(wrapper, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    saved_world, world = int(meta["world_size"]), _world()
    if saved_world == world:
        rng = torch.load(ckpt / RNG_DIR / f"rank_{_rank():05d}.pt", weights_only=True)
        _set_rng_state(rng)
    elif _rank() == 0:
        warnings.warn(f"checkpoint {ckpt} was saved at world size {saved_world}, resuming at {world}: model and "
                      "optimizer resharded by DCP; the per-rank RNG states were NOT restored (random draws after "
                      "resume differ from an uninterrupted run)", stacklevel=2)
    _barrier()
    return int(meta["step"]), dict(meta.get("train_state", {}))
