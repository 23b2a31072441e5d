"""The one packed array format for teacher top-K data, shared by the proto, the cache and the trainer.

An array travels as (dtype name, shape, little-endian bytes): ``int32`` for token ids, ``float16`` or ``float32``
for log-probs. Packed bytes, not nested repeated messages, because per-token messages are several times slower
to build and parse (design.md §3). Top-K rows are sorted by log-prob, descending; a missing entry (a row with
fewer than K finite candidates) is id -1 with log-prob -inf, so every consumer can mask by ``id >= 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

PAD_ID = -1
PAD_LOGPROB = float("-inf")
DTYPES: dict[str, np.dtype] = {
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}
LOGPROB_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class PackedArray:
    """An array as it travels: dtype name, shape and raw little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def pack(array: np.ndarray, dtype: str | None = None) -> PackedArray:
    """Pack a numpy array (converted to ``dtype`` when given) into the wire format."""
    arr = np.asarray(array)
    name = dtype or arr.dtype.name
    if name not in DTYPES:
        raise ValueError(f"dtype: {name!r} is not a packable dtype; allowed: {', '.join(DTYPES)}")
    arr = np.ascontiguousarray(arr, dtype=DTYPES[name])
    return PackedArray(dtype=name, shape=tuple(int(d) for d in arr.shape), data=arr.tobytes())


def unpack(dtype: str, shape: Sequence[int], data: bytes | memoryview, field: str = "array") -> np.ndarray:
    """Decode packed bytes, checking dtype, shape and byte count; errors name ``field``.

    The result is a read-only view of ``data`` (no copy) in native byte order on little-endian machines.
    """
    if dtype not in DTYPES:
        raise ValueError(f"{field}.dtype: {dtype!r} is not allowed; use one of {', '.join(DTYPES)}")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"{field}.shape: dimensions must be >= 0, got {list(dims)}")
    itemsize = DTYPES[dtype].itemsize
    expected = int(np.prod(dims, dtype=np.int64)) * itemsize if dims else itemsize
    if len(data) != expected:
        raise ValueError(
            f"{field}.data: {len(data)} bytes do not match dtype {dtype} and shape {list(dims)} "
            f"(expected {expected} bytes)"
        )
    return np.frombuffer(data, dtype=DTYPES[dtype]).reshape(dims)


def to_proto(array: np.ndarray, dtype: str | None = None, message: Any | None = None) -> Any:
    """A ``brts.v1.Array`` message for ``array`` (fills ``message`` in place when given)."""
    from brts.proto import teacher_pb2

    packed = pack(array, dtype)
    msg = message if message is not None else teacher_pb2.Array()
    msg.dtype = packed.dtype
    del msg.shape[:]
    msg.shape.extend(packed.shape)
    msg.data = packed.data
    return msg


def from_proto(message: Any, field: str = "array") -> np.ndarray:
    """Decode a ``brts.v1.Array`` message, with errors that name ``field``."""
    return unpack(message.dtype, list(message.shape), message.data, field=field)


@dataclass(frozen=True)
class TopK:
    """Per-position top-K of one sequence: ``ids`` int32 [T, K], ``logprobs`` float [T, K], sorted descending."""

    ids: np.ndarray
    logprobs: np.ndarray

    def __post_init__(self) -> None:
        validate_topk(self.ids, self.logprobs)

    @classmethod
    def trusted(cls, ids: np.ndarray, logprobs: np.ndarray) -> "TopK":
        """Wrap arrays already known valid (checksummed cache bytes, a slice of a valid TopK) without re-checking:
        validation is a full pass over the arrays, which would dominate the cache's read path."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "ids", ids)
        object.__setattr__(obj, "logprobs", logprobs)
        return obj

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def slice_k(self, k: int) -> "TopK":
        """The top ``k`` of a larger stored K: the rows are sorted, so this is a column slice."""
        if not 1 <= k <= self.k:
            raise ValueError(f"k: must be between 1 and the stored K={self.k}, got {k}")
        if k == self.k:
            return self
        return TopK.trusted(self.ids[:, :k], self.logprobs[:, :k])

    def pack(self, logprob_dtype: str = "float32") -> tuple[PackedArray, PackedArray]:
        if logprob_dtype not in LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype: {logprob_dtype!r} is not allowed; use one of {', '.join(LOGPROB_DTYPES)}")
        return pack(self.ids, "int32"), pack(self.logprobs, logprob_dtype)

    @classmethod
    def unpack(cls, ids: PackedArray, logprobs: PackedArray, field: str = "topk") -> "TopK":
        if ids.dtype != "int32":
            raise ValueError(f"{field}_ids.dtype: must be int32, got {ids.dtype!r}")
        if logprobs.dtype not in LOGPROB_DTYPES:
            raise ValueError(f"{field}_logprobs.dtype: must be float16 or float32, got {logprobs.dtype!r}")
        return cls(
            unpack(ids.dtype, ids.shape, ids.data, f"{field}_ids"),
            unpack(logprobs.dtype, logprobs.shape, logprobs.data, f"{field}_logprobs"),
        )


def validate_topk(ids: np.ndarray, logprobs: np.ndarray, field: str = "topk") -> None:
    """Check the shared invariants: 2-D, same shape, rows descending, -1 exactly where the log-prob is -inf."""
    if ids.ndim != 2 or logprobs.ndim != 2:
        raise ValueError(f"{field}: ids and logprobs must be 2-D [positions, K], got {ids.shape} and {logprobs.shape}")
    if ids.shape != logprobs.shape:
        raise ValueError(f"{field}: ids shape {ids.shape} differs from logprobs shape {logprobs.shape}")
    if ids.dtype != np.int32:
        raise ValueError(f"{field}: ids must be int32, got {ids.dtype}")
    if logprobs.dtype not in (np.float16, np.float32):
        raise ValueError(f"{field}: logprobs must be float16 or float32, got {logprobs.dtype}")
    if ids.size == 0:
        return
    if np.isnan(logprobs).any() or (logprobs > 0).any():
        raise ValueError(f"{field}: logprobs must be <= 0 and not NaN")
    if not np.array_equal(ids == PAD_ID, np.isneginf(logprobs)):
        raise ValueError(f"{field}: id -1 must appear exactly where the log-prob is -inf (the padding sentinel)")
    if (ids < PAD_ID).any():
        raise ValueError(f"{field}: ids must be >= 0, or -1 for padding")
    if (logprobs[:, 1:] > logprobs[:, :-1]).any():
        raise ValueError(f"{field}: each row must be sorted by log-prob, descending")


def pad_topk(ids: np.ndarray, logprobs: np.ndarray, k: int) -> TopK:
    """Widen rows with fewer than ``k`` entries (engines may return fewer) with the -1/-inf sentinel."""
    ids = np.asarray(ids, dtype=np.int32)
    logprobs = np.asarray(logprobs, dtype=np.float32)
    if ids.shape[1] > k:
        raise ValueError(f"k: rows already have {ids.shape[1]} entries, more than k={k}")
    extra = k - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=PAD_ID)
    logprobs = np.pad(logprobs, ((0, 0), (0, extra)), constant_values=PAD_LOGPROB)
    return TopK(ids, logprobs)


def topk_from_rows(rows: Sequence[Sequence[tuple[int, float]]], k: int) -> TopK:
    """Build a TopK from per-position lists of (id, log-prob) pairs in any order, keeping the best ``k``.

    This is how engine replies (vLLM dicts, SGLang triples) become the shared format; rows with fewer than ``k``
    entries are padded, never an error (engine-apis.md §1 (vi)).
    """
    ids = np.full((len(rows), k), PAD_ID, dtype=np.int32)
    lps = np.full((len(rows), k), PAD_LOGPROB, dtype=np.float32)
    for t, row in enumerate(rows):
        best = sorted(
            ((float(lp), int(i)) for i, lp in row if lp is not None and np.isfinite(lp)), key=lambda p: (-p[0], p[1])
        )[:k]
        for j, (lp, i) in enumerate(best):
            ids[t, j], lps[t, j] = i, lp
    return TopK(ids, lps)
