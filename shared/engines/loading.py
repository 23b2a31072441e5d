"""Model loading for every in-process engine and the exact scorer: device and dtype names, the loader, the logits
dimension.

Why one module: the hf engine, the exact scorer (``Score`` with every engine), the student's hf rollouts and the
trainer's checks must see the same weights in the same dtype on the same device, so they share one loader and one
reading of ``"auto"``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["load_causal_lm", "logits_dim", "resolve_device", "resolve_dtype"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` means CUDA when present, else CPU: the scorer and the engine must share one device."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str) or not device:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({exc})") from exc


def resolve_dtype(dtype: str | torch.dtype = "auto") -> torch.dtype | str:
    """Map a config-style dtype name to a torch dtype; ``"auto"`` keeps the checkpoint's own dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype: expected 'auto' or one of {', '.join(_DTYPES)}, got {dtype!r}")


def load_causal_lm(
    path: str | os.PathLike[str], device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"
) -> Any:
    """Load a causal LM from a local folder (offline), in eval mode, on ``device``.

    One loader for the scorer and the hf engine so that both see the same weights in the same dtype.
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(os.fspath(path), dtype=resolve_dtype(dtype), local_files_only=True)
    return model.to(dev).eval()


def logits_dim(model: Any) -> int:
    """The logits dimension: rows of the output embedding (the config's vocab_size, which may exceed the
    tokenizer's length). Read from the weight, because that is what the logits actually have."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError("model: expected a causal LM with an output embedding (lm_head); got none")
    return int(head.weight.shape[0])
