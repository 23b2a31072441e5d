"""Byte formats of the candidate cache: one entry (a candidate) and one pool header, each checksummed.

Why this layout: a value is ``MAGIC | version | checksum | zstd(body)``. The checksum (blake2b-64 over the
compressed body) lets ``brts cache verify`` and every read detect damage without decompressing twice; zstd over
byte-planed arrays is what gets the toy teacher's K=16 candidates far below the raw ~100 B/token (int32 ids have
two or three zero high bytes, and the float planes share exponents), while decoding stays a single
``decompress`` plus a numpy transpose per array.

The teacher top-K is stored sorted at the largest K asked for so far; a smaller K is a column slice
(``brts.shared.topk.TopK.slice_k``). The answer, the finish reason and the flags are stored, never the verdict:
correctness is judged per request against that request's ground truth (design.md §4).

Provenance: the flags byte's bits 16 and 32 hold where the top-K came from (``Entry.source``, ``_SOURCE_CODES``:
0 the exact scorer, 1 the engine's decode-time numbers, 2 the engine's prefill). 0 is the scorer so every entry
written before provenance existed reads as what produced it, and the format version stays 1 (additive). An entry
without a top-K stores 0: it has no numbers to attribute.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import zstandard

from brts.shared.engines.base import SOURCE_DECODE, SOURCE_PREFILL, SOURCE_SCORER
from brts.shared.topk import DTYPES, TopK

MAGIC_ENTRY = b"BRTe"
MAGIC_POOL = b"BRTp"
FORMAT_VERSION = 1
_ENVELOPE = struct.Struct("<4sB8s")  # magic, format version, checksum of the rest
# tier, finish, flags, logprob dtype, index, T, K, answer bytes, created, seed, top-K id vocabulary size,
# its index width
_ENTRY_HEAD = struct.Struct("<BBBBIIHHdIIB")
_INDEX_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<i4")}
_FINISH = ("stop", "length")
_LOGPROB_CODES = {"float32": 0, "float16": 1}
_LEAKED, _PERTURBED, _HAS_TOPK, _HAS_ANSWER = 1, 2, 4, 8
_SOURCE_SHIFT, _SOURCE_MASK = 4, 0b11  # flags bits 16 and 32: the top-K's provenance
_SOURCE_CODES = {SOURCE_SCORER: 0, SOURCE_DECODE: 1, SOURCE_PREFILL: 2}  # 0 = what every older entry is
_SOURCES = {code: source for source, code in _SOURCE_CODES.items()}
ZSTD_LEVEL = 3


class CorruptEntryError(ValueError):
    """A stored value failed its checksum or could not be parsed: the bytes on disk are damaged."""


_local = threading.local()


def _zstd() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    """zstandard (de)compressors are not thread-safe; one pair per thread."""
    pair = getattr(_local, "pair", None)
    if pair is None:
        pair = (zstandard.ZstdCompressor(level=ZSTD_LEVEL), zstandard.ZstdDecompressor())
        _local.pair = pair
    return pair


def checksum(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def _seal(magic: bytes, body: bytes) -> bytes:
    packed = _zstd()[0].compress(body)
    return _ENVELOPE.pack(magic, FORMAT_VERSION, checksum(packed)) + packed


def _open(magic: bytes, value: bytes | memoryview, what: str) -> bytes:
    if len(value) < _ENVELOPE.size:
        raise CorruptEntryError(f"{what}: {len(value)} bytes is shorter than the envelope")
    got_magic, version, digest = _ENVELOPE.unpack_from(value)
    if got_magic != magic:
        raise CorruptEntryError(f"{what}: bad magic {got_magic!r} (expected {magic!r})")
    if version != FORMAT_VERSION:
        raise CorruptEntryError(f"{what}: format version {version}, this brts reads {FORMAT_VERSION}")
    packed = memoryview(value)[_ENVELOPE.size :]
    if checksum(packed) != digest:
        raise CorruptEntryError(f"{what}: checksum mismatch (the stored bytes are damaged)")
    try:
        return _zstd()[1].decompress(packed)
    except zstandard.ZstdError as exc:
        raise CorruptEntryError(f"{what}: {exc}") from exc


def check_value(value: bytes | memoryview, what: str = "value") -> None:
    """Verify a stored value's envelope and checksum without decoding the arrays (``brts cache verify``)."""
    magic = bytes(value[:4])
    _open(magic if magic in (MAGIC_ENTRY, MAGIC_POOL) else MAGIC_ENTRY, value, what)


def _planes(array: np.ndarray) -> bytes:
    """Byte planes of a little-endian array: all first bytes, then all second bytes... (zstd loves the zeros)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return flat.view(np.uint8).reshape(flat.size, flat.itemsize).T.tobytes()


def _unplanes(data: bytes | memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    planes = np.frombuffer(data, dtype=np.uint8, count=n * dtype.itemsize).reshape(dtype.itemsize, n)
    out = np.empty((n, dtype.itemsize), dtype=np.uint8)
    for i in range(dtype.itemsize):  # one strided copy per plane: ~5x faster than a transposed copy
        out[:, i] = planes[i]
    return out.view(dtype).reshape(shape)


def _narrow(logprobs: np.ndarray, dtype: str) -> np.ndarray:
    """Log-probs in the stored dtype. float16 keeps ~3.3 significant digits (|error| <= 0.004 nats at -8..-16),
    far below what distillation targets need, and halves the bytes that do not compress (the mantissas); finite
    values below float16's range are clamped so they never turn into the -inf padding sentinel."""
    if dtype == "float32":
        return logprobs.astype(DTYPES["float32"], copy=False)
    finite = np.isfinite(logprobs)
    return np.where(finite, np.maximum(logprobs, -65504.0), logprobs).astype(DTYPES["float16"])


@dataclass
class Entry:
    """One stored candidate: a Tier-1 pool sample or a Tier-2 attempt (``topk`` None for unkept attempts)."""

    tier: int
    index: int
    token_ids: np.ndarray  # int32 [T]
    finish_reason: str
    answer: str | None
    leaked: bool = False
    perturbed: bool = False
    topk: TopK | None = None
    seed: int = 0
    created: float = 0.0
    source: str = SOURCE_SCORER  # where ``topk`` came from (brts.shared.engines.base.LOGPROB_SOURCES)

    @property
    def k(self) -> int:
        return 0 if self.topk is None else self.topk.k


def encode_entry(entry: Entry, logprob_dtype: str = "float32") -> bytes:
    if entry.finish_reason not in _FINISH:
        raise ValueError(f"finish_reason: must be one of {_FINISH}, got {entry.finish_reason!r}")
    if logprob_dtype not in _LOGPROB_CODES:
        raise ValueError(f"logprob_dtype: must be one of {tuple(_LOGPROB_CODES)}, got {logprob_dtype!r}")
    if entry.source not in _SOURCE_CODES:
        raise ValueError(f"source: must be one of {tuple(_SOURCE_CODES)}, got {entry.source!r}")
    tokens = np.ascontiguousarray(entry.token_ids, dtype=DTYPES["int32"])
    answer = (entry.answer or "").encode()
    if len(answer) > 0xFFFF:
        answer = answer[:0xFFFF]  # an answer this long is garbage anyway; keep the entry storable
    flags = (_LEAKED * entry.leaked) | (_PERTURBED * entry.perturbed) | (_HAS_ANSWER * (entry.answer is not None))
    parts = [b"", answer, _planes(tokens)]
    k, vocab_size, width = 0, 0, 0
    if entry.topk is not None:
        if entry.topk.length != tokens.size:
            raise ValueError(f"topk: {entry.topk.length} rows for {tokens.size} tokens")
        flags |= _HAS_TOPK | (_SOURCE_CODES[entry.source] << _SOURCE_SHIFT)
        k = entry.topk.k
        # top-K ids as indices into the entry's own sorted id set: a response touches a few hundred or thousand
        # distinct ids, so 1-2 byte indices replace 4-byte ids (-5 B/token after zstd on the toy teacher)
        vocab, index = np.unique(entry.topk.ids, return_inverse=True)
        width = 1 if vocab.size <= 1 << 8 else 2 if vocab.size <= 1 << 16 else 4
        vocab_size = int(vocab.size)
        parts.append(_planes(vocab.astype(DTYPES["int32"])))
        parts.append(_planes(index.reshape(-1).astype(_INDEX_DTYPES[width])))
        parts.append(_planes(_narrow(entry.topk.logprobs, logprob_dtype)))
    parts[0] = _ENTRY_HEAD.pack(
        entry.tier, _FINISH.index(entry.finish_reason), flags, _LOGPROB_CODES[logprob_dtype], entry.index, tokens.size,
        k, len(answer), entry.created, entry.seed & 0xFFFF_FFFF, vocab_size, width,
    )
    return _seal(MAGIC_ENTRY, b"".join(parts))


def decode_entry(value: bytes | memoryview, what: str = "entry") -> Entry:
    body = _open(MAGIC_ENTRY, value, what)
    try:
        (
            tier, finish, flags, lp_code, index, n, k, answer_len, created, seed, n_vocab, width
        ) = _ENTRY_HEAD.unpack_from(body)
        at = _ENTRY_HEAD.size
        answer = body[at : at + answer_len].decode() if flags & _HAS_ANSWER else None
        at += answer_len
        tokens = _unplanes(body[at : at + 4 * n], DTYPES["int32"], (n,))
        at += 4 * n
        topk = None
        if flags & _HAS_TOPK:
            lp_dtype = DTYPES["float16" if lp_code == 1 else "float32"]
            vocab = _unplanes(body[at : at + 4 * n_vocab], DTYPES["int32"], (n_vocab,))
            at += 4 * n_vocab
            idx_dtype = _INDEX_DTYPES[width]
            index_ = _unplanes(body[at : at + idx_dtype.itemsize * n * k], idx_dtype, (n, k))
            at += idx_dtype.itemsize * n * k
            if index_.size and int(index_.max()) >= n_vocab:
                raise ValueError("top-K id index past the entry's id set")
            ids = vocab[index_]
            lps = _unplanes(body[at : at + lp_dtype.itemsize * n * k], lp_dtype, (n, k))
            at += lp_dtype.itemsize * n * k
            topk = TopK.trusted(ids, lps)  # the checksum held: these are the bytes a valid TopK was packed from
        if at != len(body):
            raise ValueError(f"{len(body) - at} trailing bytes")
        code = (flags >> _SOURCE_SHIFT) & _SOURCE_MASK
        if code not in _SOURCES:
            raise ValueError(f"log-prob source code {code} (a newer brts wrote it?)")
        return Entry(tier, index, tokens, _FINISH[finish], answer, bool(flags & _LEAKED), bool(flags & _PERTURBED),
                     topk, seed, created, source=_SOURCES[code])
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise CorruptEntryError(f"{what}: cannot be parsed ({exc})") from exc


@dataclass
class PoolHeader:
    """Who a pool belongs to. The full prompt ids are stored and compared on every read, so a key-hash collision
    is detected instead of served."""

    kind: str  # "tier1" | "tier2" | "perturbed"
    teacher: str
    prompt_ids: np.ndarray  # int32
    sampling: dict[str, Any]
    ground_truth: str = ""  # Tier 2 only: the hint holds it
    hint_version: str = ""
    perturbation: str = ""
    created: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def matches(self, other: "PoolHeader") -> bool:
        """Same pool (everything in the key), whatever the creation time."""
        return (
            self.kind == other.kind
            and self.teacher == other.teacher
            and np.array_equal(self.prompt_ids, other.prompt_ids)
            and self.sampling == other.sampling
            and self.ground_truth == other.ground_truth
            and self.hint_version == other.hint_version
            and self.perturbation == other.perturbation
            and self.extra.get("perturb_position") == other.extra.get("perturb_position")
        )


def encode_pool(header: PoolHeader) -> bytes:
    meta = {
        "kind": header.kind, "teacher": header.teacher, "sampling": header.sampling,
        "ground_truth": header.ground_truth, "hint_version": header.hint_version,
        "perturbation": header.perturbation, "created": header.created, "extra": header.extra,
    }
    blob = json.dumps(meta, sort_keys=True).encode()
    ids = np.ascontiguousarray(header.prompt_ids, dtype=DTYPES["int32"])
    return _seal(MAGIC_POOL, struct.pack("<I", len(blob)) + blob + ids.tobytes())


def decode_pool(value: bytes | memoryview, what: str = "pool") -> PoolHeader:
    body = _open(MAGIC_POOL, value, what)
    try:
        (n,) = struct.unpack_from("<I", body)
        meta = json.loads(body[4 : 4 + n])
        rest = body[4 + n :]
        if len(rest) % 4:
            raise ValueError("prompt ids are not whole int32s")
        ids = np.frombuffer(rest, dtype=DTYPES["int32"]).copy()
        return PoolHeader(meta["kind"], meta["teacher"], ids, meta["sampling"], meta["ground_truth"],
                          meta["hint_version"], meta["perturbation"], meta["created"], meta.get("extra", {}))
    except (struct.error, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise CorruptEntryError(f"{what}: cannot be parsed ({exc})") from exc


def entry_tokens(entries: Sequence[Entry]) -> int:
    return int(sum(e.token_ids.size for e in entries))
