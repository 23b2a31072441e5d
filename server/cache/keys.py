"""Cache keys: which pool a request reads, and the byte keys of LMDB records.

A pool is addressed by a hash of everything that changes its samples (design.md §4): the teacher fingerprint,
the prompt token ids, the sampling settings that change the distribution (temperature, top_p, top_k,
max_new_tokens) and the seed the per-sample seeds derive from. A Tier-2 pool adds the ground truth and the hint
template's version (the hinted prompt contains the answer), a perturbed slot's pool adds the perturbation text.
Correctness is never part of a key. The hash is only an address: the header stores the full prompt ids and
settings, and a read compares them (``PoolHeader.matches``).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from brts.server.cache.codec import PoolHeader
from brts.shared.engines.base import SamplingParams
from brts.shared.hints import AFTER_TEMPLATE, HINT_VERSION

KEY_VERSION = b"brts-pool-v1"
POOL_KEY_BYTES = 16
KINDS = ("tier1", "tier2", "perturbed")


def sampling_key(sampling: SamplingParams, seed: int) -> dict[str, Any]:
    """The settings that change the drawn samples, as a canonical dict (the per-sample seeds come from ``seed``)."""
    return {
        "temperature": round(float(sampling.temperature), 6),
        "top_p": round(float(sampling.top_p), 6),
        "top_k": int(sampling.top_k),
        "max_new_tokens": int(sampling.max_new_tokens),
        "seed": int(seed),
    }


@dataclass(frozen=True)
class PoolAddress:
    """A pool's key and the header it must carry."""

    key: bytes
    header: PoolHeader


def pool_address(
    kind: str,
    teacher: str,
    prompt_ids: Sequence[int],
    sampling: dict[str, Any],
    ground_truth: str = "",
    perturbation: str = "",
    created: float = 0.0,
    perturb_position: str = AFTER_TEMPLATE,
) -> PoolAddress:
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
    if not teacher:
        raise ValueError("teacher: a teacher fingerprint is required (it keeps teachers' entries apart)")
    if kind == "tier2" and not ground_truth.strip():
        raise ValueError("ground_truth: required for a Tier-2 pool (the hint holds it)")
    ids = np.asarray(prompt_ids, dtype=np.int32)
    hint_version = HINT_VERSION if kind == "tier2" else ""
    # a perturbation placed inside the user turn samples after other ids: its own pool. after_template adds
    # nothing to the header or the hash, so pools written before the setting existed keep their keys
    placed = kind == "perturbed" and perturb_position != AFTER_TEMPLATE
    header = PoolHeader(
        kind=kind, teacher=teacher, prompt_ids=ids, sampling=dict(sampling),
        ground_truth=ground_truth if kind == "tier2" else "", hint_version=hint_version,
        perturbation=perturbation if kind == "perturbed" else "", created=created,
        extra={"perturb_position": perturb_position} if placed else {},
    )
    h = hashlib.blake2b(digest_size=POOL_KEY_BYTES)
    parts = [KEY_VERSION, kind.encode(), teacher.encode(), json.dumps(header.sampling, sort_keys=True).encode(),
             header.ground_truth.encode(), hint_version.encode(), header.perturbation.encode(), ids.tobytes()]
    if placed:
        parts.append(f"perturb_position={perturb_position}".encode())
    for part in parts:
        h.update(struct.pack("<Q", len(part)))  # length-prefixed, so no two field splits hash alike
        h.update(part)
    return PoolAddress(h.digest(), header)


def entry_key(pool_key: bytes, index: int) -> bytes:
    """Pool key + big-endian index, so a cursor walks a pool's entries in index order."""
    return pool_key + struct.pack(">I", index)


def split_entry_key(key: bytes | memoryview) -> tuple[bytes, int]:
    key = bytes(key)
    return key[:POOL_KEY_BYTES], struct.unpack(">I", key[POOL_KEY_BYTES:])[0]


def name_key(prompt_id: str, pool_key: bytes) -> bytes:
    """Index from the caller's prompt id (e.g. a DAPO row id) to its pools, for ``brts cache inspect``."""
    return prompt_id.encode() + b"\x00" + pool_key


def split_name_key(key: bytes | memoryview) -> tuple[str, bytes]:
    key = bytes(key)
    return key[: -POOL_KEY_BYTES - 1].decode(errors="replace"), key[-POOL_KEY_BYTES:]
