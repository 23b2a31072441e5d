"""Training config files: find one (a path or a shipped config's name) and turn it into a TrainConfig plus the
:class:`LaunchSpec` of its ``launch:`` section.

Why a module of its own, apart from the machine checks in :mod:`brts.trainer.preflight`: the launcher, the CLI, the
demo, the benches and the ranks all need to *read* a config, and only some of them need to probe the machine. Why
in the trainer package and not in ``brts.shared.config``: the launch spec and the shipped YAML files belong to the
trainer (package data of ``brts.trainer``), and shared/ must not import trainer/.

A config file is a YAML mapping of :class:`~brts.shared.config.TrainConfig` settings at top level, plus an
optional ``launch:`` section of :class:`LaunchSpec` settings, which says where the run is meant to run (ranks,
device, backend, minimum memory). ``launch`` is not a TrainConfig field: it is split off here before the rest is
validated, and ``launch.nproc=4``-style overrides reach it the same way. The shipped configs live in
``brts/trainer/configs`` and can be named without their folder or suffix (``paper_brts_n4``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from brts.shared.config import (
    ConfigError,
    TrainConfig,
    _merge,
    _Validated,
    from_dict,
    parse_overrides,
    read_config_file,
)

__all__ = ["CONFIG_DIR", "LaunchSpec", "load_train_config", "resolve_config", "shipped_configs"]

#: The shipped configs (installed as package data of brts.trainer).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class LaunchSpec(_Validated):
    """Where a config is meant to run; read by :func:`~brts.trainer.preflight.preflight` and by the launcher
    (``brts train``).

    ``nproc`` ranks on this node; ``device`` ``cuda`` needs one visible GPU per rank, ``cpu`` runs every rank on
    the CPU, ``auto`` uses CUDA when torch sees a GPU. ``backend`` ``auto`` is nccl on CUDA and gloo on CPU.
    ``min_gpu_memory_gib`` is per GPU (total memory, GiB); ``min_host_memory_gib`` is this node's available RAM.
    """

    SECTION = "launch"
    nproc: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    min_gpu_memory_gib: float | None = None
    min_host_memory_gib: float | None = None

    def check(self) -> None:
        self.require(self.nproc >= 1, "nproc", "must be >= 1")
        if self.backend == "nccl" and self.device == "cpu":
            self.fail("backend", "nccl needs device cuda; use gloo (or auto) with device cpu")
        if self.min_gpu_memory_gib is not None:
            self.require(self.min_gpu_memory_gib > 0, "min_gpu_memory_gib", "must be > 0 when set")
            if self.device == "cpu":
                self.fail("min_gpu_memory_gib", "is a GPU requirement; leave it unset with device cpu")
        self.require(self.min_host_memory_gib is None or self.min_host_memory_gib > 0, "min_host_memory_gib",
                     "must be > 0 when set")

    def backend_for(self, device: str) -> str:
        """The process-group backend for a resolved device (``cuda`` or ``cpu``)."""
        if self.backend != "auto":
            return self.backend
        return "nccl" if device == "cuda" else "gloo"


def shipped_configs() -> list[Path]:
    """Every YAML under :data:`CONFIG_DIR`, sorted by name."""
    return sorted(CONFIG_DIR.glob("*.yaml"))


def resolve_config(path: str | os.PathLike[str]) -> Path:
    """A config file: the path as given if it exists, else a shipped config by name (``paper_brts_n4[.yaml]``)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    text = os.fspath(path)
    if os.sep not in text and "/" not in text:
        for candidate in (CONFIG_DIR / text, CONFIG_DIR / f"{text}.yaml"):
            if candidate.is_file():
                return candidate
    names = ", ".join(q.stem for q in shipped_configs())
    raise ConfigError(f"config file {p}: does not exist (shipped configs: {names})")


def load_train_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (),
                      **values: Any) -> tuple[TrainConfig, LaunchSpec]:
    """Build (TrainConfig, LaunchSpec) from a YAML file (or a shipped config's name), then keyword ``values``
    (None ignored), then ``key=value`` overrides; ``launch.*`` keys go to the LaunchSpec. Raises ConfigError
    naming the field (``train.lr: must be > 0, got -1.0``, ``launch.nproc: must be >= 1, got 0``)."""
    data: dict[str, Any] = read_config_file(resolve_config(path)) if path is not None else {}
    data = _merge(data, {k: v for k, v in values.items() if v is not None})
    data = _merge(data, parse_overrides(overrides))
    launch = data.pop("launch", None)
    config = from_dict(TrainConfig, data)
    spec = from_dict(LaunchSpec, {} if launch is None else launch, "launch")
    return config, spec
