"""The teacher fingerprint: one string that changes whenever the teacher's outputs could.

Why: the cache keys every pool by it, so a teacher swap never serves the old teacher's candidates, and a client
can pin the teacher it expects (``expected_teacher``). It hashes the model's config, its generation config, the
bytes of every weights file and the tokenizer's own fingerprint (the id<->token map). Hashing weights costs a
read of the files once per (path, size, mtime) per process (about 1 s per GB); ``override`` lets a user name a
teacher whose files they know to be the same, e.g. a copy on another file system.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

FINGERPRINT_VERSION = "brts-teacher-v1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CONFIG_FILES = ("config.json", "generation_config.json")
_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    with _memo_lock:
        _memo[key] = digest
    return digest


def teacher_fingerprint(model_dir: str | os.PathLike[str], tokenizer: Any | None = None,
                        override: str | None = None) -> str:
    """``teacher-<16 hex>`` for the model folder (and tokenizer); ``override`` is returned as given."""
    if override:
        return override
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"model: {folder} is not a directory (a local Hugging Face model folder is expected)")
    weights = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not weights:
        raise ValueError(f"model: {folder} holds no weights file ({', '.join(_WEIGHT_SUFFIXES)})")
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for name in _CONFIG_FILES:
        path = folder / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"-") + b"\0")
    for path in weights:
        h.update(str(path.relative_to(folder)).encode() + b"\0" + _file_digest(path).encode() + b"\0")
    if tokenizer is not None:
        from brts.shared.tokenizer import tokenizer_fingerprint

        h.update(b"tokenizer\0" + tokenizer_fingerprint(tokenizer).encode())
    return "teacher-" + h.hexdigest()[:16]
