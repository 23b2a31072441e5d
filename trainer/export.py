"""The trained student out of a DCP checkpoint: unsharded weights in one process, or a Hugging Face model folder.

Why a module of its own: export runs after training, in one process with no process group and no torchrun
(``brts train export CKPT OUT --base-model DIR``), and reads only the model section of a checkpoint; it shares
nothing with saving and resuming but the checkpoint layout (``checkpoint.py``) and its resolver, so
``RUN_DIR``, ``RUN_DIR/checkpoints``, ``RUN_DIR/checkpoints/latest`` and ``step_N`` all name a checkpoint here
exactly as they do for ``--resume``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from brts.trainer.checkpoint import DCP_DIR, META, resolve_checkpoint, single_process_ok

__all__ = ["export_hf", "load_full_model_state"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_WRAPPER_PREFIXES = ("model.", "")  # StudentLogProbs keeps the HF model at .model; a bare HF model has none


def _resolve_dtype(dtype: str | torch.dtype, config: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(saved, torch.dtype):
            return saved
        return getattr(torch, saved) if isinstance(saved, str) and hasattr(torch, saved) else torch.float32
    return getattr(torch, dtype)


def _model_keys(ckpt: Path) -> tuple[Any, dict[str, Any]]:
    """The DCP reader and ``{key inside the model section: storage metadata}`` (tensors only)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(ckpt / DCP_DIR))
    md = reader.read_metadata().state_dict_metadata
    return reader, {k[len("model."):]: v for k, v in md.items()
                    if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}


def _load_into(ckpt: Path, targets: Mapping[str, torch.Tensor]) -> set[str]:
    """Load the checkpoint's model weights in place into ``targets`` (HF keys → full tensors), one process.

    The wrapper's prefix (``model.`` for ``StudentLogProbs``, none for a bare HF model) is the one that matches
    most keys. Returns the keys loaded; raises ``ValueError`` on a shape mismatch."""
    import torch.distributed.checkpoint as dcp

    reader, stored = _model_keys(ckpt)
    prefix = max(_WRAPPER_PREFIXES, key=lambda p: sum(f"{p}{k}" in stored for k in targets))
    state, seen = {}, {}
    for k, t in targets.items():
        md = stored.get(f"{prefix}{k}")
        if md is None:
            continue
        if tuple(md.size) != tuple(t.shape):
            raise ValueError(f"{k}: shape {tuple(md.size)} in checkpoint {ckpt}, {tuple(t.shape)} in the model")
        where = (t.data_ptr(), tuple(t.shape))
        if where in seen:  # tied weights: one tensor under two names, load it once
            continue
        seen[where] = k
        state[f"{prefix}{k}"] = t
    with single_process_ok():
        dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    return {k for k in targets if f"{prefix}{k}" in stored}


def load_full_model_state(checkpoint_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The student's unsharded weights from a checkpoint (run dir, ``latest`` followed, or a checkpoint), in one
    process with no process group, keyed like the HF model's own ``state_dict`` (``model.model.layers.0...`` →
    ``model.layers.0...``). Reads the model section only; memory: one full copy of the weights."""
    ckpt = resolve_checkpoint(checkpoint_path)
    _, stored = _model_keys(ckpt)
    prefix = "model." if stored and all(k.startswith("model.") for k in stored) else ""
    targets = {k[len(prefix):]: torch.empty(md.size, dtype=md.properties.dtype) for k, md in stored.items()}
    _load_into(ckpt, targets)
    return targets


def export_hf(checkpoint_path: str | os.PathLike, base_model_dir: str | os.PathLike, out_dir: str | os.PathLike,
              dtype: str | torch.dtype = "auto") -> Path:
    """Write the checkpoint's student as a Hugging Face model directory (``from_pretrained(out_dir)`` loads it).

    One process, no torchrun: the architecture comes from ``base_model_dir``'s config (the model the run started
    from), the weights from the checkpoint (DCP reshards the saved shards into full tensors; the optimizer state
    is not read). ``dtype``: "auto" = the base config's dtype (bf16 for Qwen2.5 releases; the fp32 master weights
    are rounded), or e.g. "float32" to keep them exact. Tokenizer files and ``generation_config.json`` are copied
    from ``base_model_dir`` when present. Tied input/output embeddings need only one of the two in the checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = resolve_checkpoint(checkpoint_path)
    base, out = Path(base_model_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(base)
    target = _resolve_dtype(dtype, config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # the checkpoint holds fp32 masters
    own = model.state_dict()  # the parameters themselves: DCP loads into them in place
    loaded = _load_into(ckpt, own)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out_emb = model.get_output_embeddings()
    head_keys = {f"{n}.weight" for n, m in model.named_modules() if tied and out_emb is not None and m is out_emb}
    missing = [k for k in own if k not in loaded and k not in head_keys]
    if missing:
        raise ValueError(f"checkpoint {ckpt} lacks {len(missing)} of the model's weights (e.g. {missing[:3]}): "
                       f"is {base} the model this run started from?")
    model.to(target)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
    meta = json.loads((ckpt / META).read_text(encoding="utf-8"))
    (out / "brts_export.json").write_text(json.dumps(
        {"checkpoint": str(ckpt), "step": meta["step"], "base_model": str(base), "dtype": str(target).split(".")[-1]},
        indent=2) + "\n", encoding="utf-8")
    return out
