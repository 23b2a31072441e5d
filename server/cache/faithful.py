"""Is the cache still faithful to the teacher serving now? Cached top-K log-probs against the live teacher's.

Why: entries are keyed by the teacher fingerprint, and a fingerprint can be a name (``--teacher-fingerprint``).
A teacher swapped under the same name would serve stale numbers silently. Offline-KD caches check this the way
done here (eullm's design record): score the cached tokens again with the live teacher, at the stored ids, and
compare with a tolerance taken from a live-vs-live control in the same run.

The rule, per stored value ``s`` and live value ``l`` (log-probs at the same id, same position, after the same
original prompt): ``drift = |l - s| - rounding(s)``, where ``rounding`` is half a unit in the last place of the
stored dtype (float16: ~2.4e-4 at -0.5, ~3.9e-3 at -8; float32: ~1e-7 at -8). The live-vs-live control scores
every item twice, once in batches and once alone (as the server's own batching would vary), and its largest
difference is the ``spread``. Each entry is allowed ``spread + SLACK + source_allowance(source, dtype)``: its
source is where its numbers came from (``Entry.source``), ``dtype`` the live teacher's compute dtype
(``Info.dtype``). The allowance is 0 for the exact scorer's numbers, which a live re-score reproduces, and
``engine_tolerance(dtype)`` for an engine's (decode-time or engine-prefill numbers), which differ from a prefill
re-score by more than one re-score differs from another (other kernels, other batch shapes; on a bf16 GPU by up
to ~0.1 nats). The cache is faithful when every entry's worst drift is within its allowed amount, i.e. per
source: worst drift of the source's entries <= spread + SLACK + that source's allowance. A wrong teacher misses
by whole nats, so the wider bound still catches it. Ids are compared by their log-probs, not as lists:
near-ties swap within float16 rounding.

Also here: the record of which tokenizer each teacher fingerprint wrote with (``record_tokenizer``): token ids
mean nothing under another tokenizer, so no comparison is made when the live server's differs.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from brts.server.cache.codec import CorruptEntryError, decode_entry, decode_pool
from brts.server.cache.keys import POOL_KEY_BYTES
from brts.server.cache.store import LmdbStore
from brts.shared.engines.base import LOGPROB_SOURCES, SOURCE_SCORER, source_allowance

TOKENIZER_KEY = b"tokenizer/"  # + teacher fingerprint, in the "meta" database
SLACK = 1e-5  # nats: float32 rounding of the comparison itself


def record_tokenizer(store: LmdbStore, teacher: str, tokenizer_fingerprint: str) -> None:
    """Remember, once, the tokenizer fingerprint a teacher fingerprint writes with (additive: older caches have
    no record; the first writer's record stays)."""
    key = TOKENIZER_KEY + teacher.encode()
    with store.read() as txn:
        if txn.get(key, db=store.db["meta"]) is not None:
            return
    store.write(lambda txn: txn.put(key, tokenizer_fingerprint.encode(), db=store.db["meta"], overwrite=False))


def recorded_tokenizer(path: str | os.PathLike[str], teacher: str) -> str | None:
    with LmdbStore(path, readonly=True) as store, store.read() as txn:
        found = txn.get(TOKENIZER_KEY + teacher.encode(), db=store.db["meta"])
    return None if found is None else bytes(found).decode()


@dataclass(frozen=True)
class CachedCandidate:
    """One stored candidate of a teacher: after ``prompt_ids`` (the original prompt), ``token_ids``, and at each
    position the stored top-K ``ids`` [T, K] with their ``logprobs`` [T, K] (the stored dtype), which came from
    ``source`` (its tolerance depends on it)."""

    prompt_ids: np.ndarray
    token_ids: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    source: str = SOURCE_SCORER


def sample_cached(path: str | os.PathLike[str], teacher: str, n: int, seed: int) -> list[CachedCandidate]:
    """``n`` stored candidates (with top-K) of ``teacher``, drawn with ``seed`` from all of its entries."""
    with LmdbStore(path, readonly=True) as store, store.read() as txn:
        headers = {}
        for key, value in txn.cursor(db=store.db["pools"]):
            try:
                header = decode_pool(value)
            except CorruptEntryError:
                continue
            if header.teacher == teacher:
                headers[bytes(key)] = header
        keys = [bytes(k) for k in txn.cursor(db=store.db["entries"]).iternext(values=False)
                if bytes(k)[:POOL_KEY_BYTES] in headers]
        random.Random(seed).shuffle(keys)
        out: list[CachedCandidate] = []
        for key in keys:
            entry = decode_entry(txn.get(key, db=store.db["entries"]))
            if entry.topk is None or entry.token_ids.size == 0:
                continue
            header = headers[key[:POOL_KEY_BYTES]]
            out.append(CachedCandidate(header.prompt_ids, entry.token_ids, np.asarray(entry.topk.ids),
                                       np.asarray(entry.topk.logprobs), entry.source))
            if len(out) == n:
                break
    return out


def rounding(stored: np.ndarray) -> np.ndarray:
    """Half a unit in the last place of each stored value, in its own dtype (float64 out)."""
    return np.spacing(np.abs(stored)).astype(np.float64) / 2


def drift_report(stored: Sequence[np.ndarray], ids: Sequence[np.ndarray], live: Sequence[np.ndarray],
                 control: Sequence[np.ndarray], sources: Sequence[str] | None = None,
                 dtype: str = "") -> dict[str, Any]:
    """Compare stored log-probs with live ones at the stored ids (pure). ``live`` and ``control`` are the same
    items scored twice; padding (id -1) is left out; ``sources`` says where each item's stored numbers came from
    (None: all the scorer's), ``dtype`` is the live teacher's. Returns the worst drift, control spread, rounding,
    the base tolerance (spread + SLACK), per source the worst drift and what it was allowed, and the verdict."""
    sources = [SOURCE_SCORER] * len(stored) if sources is None else [s or SOURCE_SCORER for s in sources]
    if len(sources) != len(stored):
        raise ValueError(f"sources: {len(sources)} for {len(stored)} stored items")
    spread = worst_rounding = 0.0
    positions = 0
    per: dict[str, dict[str, Any]] = {}
    for s, i, a, b, source in zip(stored, ids, live, control, sources):
        if source not in per:  # source_allowance refuses a source it does not know, by name
            per[source] = {"candidates": 0, "positions": 0, "drift": 0.0,
                           "allowance": source_allowance(source, dtype)}
        row = per[source]
        row["candidates"] += 1
        real = np.asarray(i) >= 0
        s64, a64, b64 = (np.asarray(x, dtype=np.float64)[real] for x in (s, a, b))
        if s64.size == 0:
            continue
        positions += int(np.asarray(i).shape[0])
        row["positions"] += int(np.asarray(i).shape[0])
        spread = max(spread, float(np.max(np.abs(a64 - b64))))
        r = rounding(np.asarray(s)[real])
        worst_rounding = max(worst_rounding, float(np.max(r)))
        row["drift"] = max(row["drift"], float(np.max(np.abs(a64 - s64) - r)))
    tolerance = spread + SLACK
    by_source = {source: per[source] for source in LOGPROB_SOURCES if source in per}
    for row in by_source.values():
        row["tolerance"] = tolerance + row["allowance"]
        row["faithful"] = row["drift"] <= row["tolerance"]
    drift = max((row["drift"] for row in by_source.values()), default=0.0)
    return {"candidates": len(stored), "positions": positions, "drift": drift, "spread": spread,
            "rounding": worst_rounding, "tolerance": tolerance, "dtype": dtype, "by_source": by_source,
            "faithful": all(row["faithful"] for row in by_source.values())}


def compare_live(samples: Sequence[CachedCandidate],
                 score: Callable[[list[list[int]], list[int], list[np.ndarray]], list[np.ndarray]],
                 batch: int = 8, dtype: str = "") -> dict[str, Any]:
    """Score every sample with the live teacher at its stored ids, in batches of ``batch`` and then alone (the
    control), and compare (``drift_report``, each sample held to its source's tolerance under the live teacher's
    compute ``dtype``). ``score(sequences, response_starts, candidate_ids)`` returns the log-probs at the given
    ids, one [T, K] array per sequence."""
    seqs = [np.concatenate([s.prompt_ids, s.token_ids]).tolist() for s in samples]
    starts = [int(s.prompt_ids.size) for s in samples]
    ids = [s.ids for s in samples]
    batched: list[np.ndarray] = []
    for at in range(0, len(samples), batch):
        batched += score(seqs[at : at + batch], starts[at : at + batch], ids[at : at + batch])
    alone = [score([q], [r], [i])[0] for q, r, i in zip(seqs, starts, ids)]
    return drift_report([s.logprobs for s in samples], ids, batched, alone, [s.source for s in samples], dtype)
