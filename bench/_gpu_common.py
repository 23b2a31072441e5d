"""gpu_check's shared pieces: making ``brts`` importable from a bare checkout, timing and peak-memory helpers
that are no-ops on CPU, and the random tiny Qwen2 the engine and scorer sections run on.

Why a module of its own: every section of bench/gpu_check.py (each in its own ``_gpu_*`` module) uses them.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3
MIB = 1024**2


# ---------------------------------------------------------------------------------------------- import shim

def ensure_importable() -> str:
    """Make ``brts`` importable: installed already, or through a folder of symlinks mirroring pyproject's
    package-dir mapping (exported in PYTHONPATH so the bench subprocesses see it too)."""
    try:
        import brts.shared.engines.hf  # noqa: F401 - imported only to test that the installed brts imports
        import brts.trainer.losses  # noqa: F401 - imported only to test that the installed brts imports

        return "installed"
    except ImportError:
        pass
    shim = Path(tempfile.gettempdir()) / "brts_import_shim"
    pkg = shim / "brts"
    pkg.mkdir(parents=True, exist_ok=True)
    for entry in (REPO / "brts").iterdir():
        link = pkg / entry.name
        if entry.suffix == ".py" and not link.exists():
            link.symlink_to(entry)
    for name, folder in (("shared", "shared"), ("server", "server"), ("trainer", "trainer"), ("proto", "proto")):
        link = pkg / name
        if not link.exists():
            link.symlink_to(REPO / folder, target_is_directory=True)
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(shim)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    for mod in [m for m in sys.modules if m == "brts" or m.startswith("brts.")]:
        del sys.modules[mod]
    import brts.shared.engines.hf  # noqa: F401 - imported only to test that brts imports through the shim

    return f"shim at {shim}"


# ---------------------------------------------------------------------------------------------- helpers

def log(msg: str = "") -> None:
    print(msg, flush=True)


def sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev: Any) -> int:
    import torch

    if dev.type != "cuda":
        return 0
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    return torch.cuda.memory_allocated(dev)


def peak_above(dev: Any, base: int) -> int | None:
    import torch

    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev) - base)


def gib(x: int | None) -> str:
    return "n/a (CPU)" if x is None else f"{x / GIB:.3f} GiB"


def rel_err(a: Any, b: Any) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tiny_qwen2(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, ctx: int, seed: int) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=ctx,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    return Qwen2ForCausalLM(config)
