"""Housekeeping over a cache directory: stats, verify, inspect, gc, compact, export.

Each works on a directory, also while a server uses it: readers open the environment read-only and see one
consistent snapshot; gc writes in bounded transactions through LMDB's own writer lock, so it interleaves with the
server's writes instead of blocking them for long. Results are plain dicts/rows so the CLI only formats them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

from brts.server.cache.codec import CorruptEntryError, check_value, decode_entry, decode_pool
from brts.server.cache.keys import POOL_KEY_BYTES, split_entry_key, split_name_key
from brts.server.cache.store import CacheError, LmdbStore
from brts.shared.engines.base import LOGPROB_SOURCES

GC_BATCH = 2000


def _pools(store: LmdbStore, txn: Any) -> dict[bytes, Any]:
    headers = {}
    for key, value in txn.cursor(db=store.db["pools"]):
        try:
            headers[bytes(key)] = decode_pool(value, f"pool {bytes(key).hex()}")
        except CorruptEntryError:
            headers[bytes(key)] = None
    return headers


def _by_source(rows: Any) -> dict[str, dict[str, int]]:
    """``{source: {"entries", "tokens"}}`` in ``LOGPROB_SOURCES`` order, sources with no entry left out."""
    return {source: dict(rows[source]) for source in LOGPROB_SOURCES if source in rows}


def stats(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Entries, pools, bytes and tokens, per teacher fingerprint and tier (Tier-2 attempts and kept ones), and the
    entries with a top-K split by where their numbers came from (``sources``: the exact scorer or an engine), since
    engine numbers are held to a wider tolerance (``brts cache verify --live``)."""
    with LmdbStore(path, readonly=True) as store, store.read() as txn:
        headers = _pools(store, txn)
        per: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(int))
        sources: dict[str, Any] = defaultdict(lambda: defaultdict(lambda: {"entries": 0, "tokens": 0}))
        for header in headers.values():
            if header is not None:
                per[header.teacher][f"pools_{header.kind}"] += 1
        damaged = 0
        for key, value in txn.cursor(db=store.db["entries"]):
            pool, _ = split_entry_key(key)
            header = headers.get(pool)
            try:
                entry = decode_entry(value)
            except CorruptEntryError:
                damaged += 1
                continue
            teacher = header.teacher if header is not None else "?"
            row = per[teacher]
            row["entries"] += 1
            row["tokens"] += int(entry.token_ids.size)
            row["value_bytes"] += len(value)
            kind = header.kind if header is not None else "?"
            row[f"entries_{kind}"] += 1
            if kind == "tier2":
                row["tier2_with_topk"] += entry.topk is not None
                row["tier2_leaked"] += entry.leaked
            row["max_k"] = max(row["max_k"], entry.k)
            if entry.topk is not None:
                by = sources[teacher][entry.source]
                by["entries"] += 1
                by["tokens"] += int(entry.token_ids.size)
        teachers = {}
        for teacher, row in per.items():
            row = dict(row)
            row["bytes_per_token"] = round(row.get("value_bytes", 0) / max(row.get("tokens", 0), 1), 2)
            row["sources"] = _by_source(sources.get(teacher, {}))
            teachers[teacher] = row
        names = txn.stat(store.db["names"])["entries"]
        disk, map_size = store.disk_bytes(), store.map_size()
    total_tokens = sum(r.get("tokens", 0) for r in teachers.values())
    totals: dict[str, Any] = defaultdict(lambda: {"entries": 0, "tokens": 0})
    for row in teachers.values():
        for source, counts in row["sources"].items():
            totals[source]["entries"] += counts["entries"]
            totals[source]["tokens"] += counts["tokens"]
    return {
        "path": str(Path(path)), "disk_bytes": disk, "map_size": map_size, "pools": len(headers),
        "entries": sum(r.get("entries", 0) for r in teachers.values()), "tokens": total_tokens,
        "disk_bytes_per_token": round(disk / max(total_tokens, 1), 2), "prompt_names": names,
        "damaged": damaged, "sources": _by_source(totals), "teachers": teachers,
    }


def verify(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Re-read every record, check every checksum and decode it; list what is damaged or orphaned."""
    problems: list[str] = []
    checked = 0
    with LmdbStore(path, readonly=True) as store, store.read() as txn:
        headers = _pools(store, txn)
        for key, header in headers.items():
            checked += 1
            if header is None:
                problems.append(f"pool {key.hex()}: damaged header")
        for key, value in txn.cursor(db=store.db["entries"]):
            checked += 1
            if progress is not None and checked % 1000 == 0:
                progress(1000)
            key = bytes(key)
            try:
                check_value(value, f"entry {key.hex()}")
                decode_entry(value, f"entry {key.hex()}")
            except CorruptEntryError as exc:
                problems.append(str(exc))
                continue
            if len(key) != POOL_KEY_BYTES + 4:
                problems.append(f"entry {key.hex()}: malformed key")
            elif key[:POOL_KEY_BYTES] not in headers:
                problems.append(f"entry {key.hex()}: no pool header (orphan)")
    return {"path": str(Path(path)), "checked": checked, "problems": problems, "ok": not problems}


def inspect(path: str | os.PathLike[str], prompt_id: str | None = None, text: str | None = None,
            tokenizer: Any | None = None, limit: int = 8) -> list[dict[str, Any]]:
    """The pools of one prompt (by the caller's prompt id, or by a substring of the decoded prompt text)."""
    if (prompt_id is None) == (text is None):
        raise ValueError("give exactly one of --prompt-id or --text")
    if text is not None and tokenizer is None:
        raise ValueError("--text needs a tokenizer to decode prompts (--tokenizer DIR)")
    out = []
    with LmdbStore(path, readonly=True) as store, store.read() as txn:
        if prompt_id is not None:
            prefix = prompt_id.encode() + b"\x00"
            cursor = txn.cursor(db=store.db["names"])
            keys = []
            if cursor.set_range(prefix):
                for key, _ in cursor:
                    if not bytes(key).startswith(prefix):
                        break
                    keys.append(split_name_key(key)[1])
        else:
            keys = [k for k, h in _pools(store, txn).items()
                    if h is not None and text in tokenizer.decode(h.prompt_ids.tolist())]
        for pool_key in keys[:limit]:
            raw = txn.get(pool_key, db=store.db["pools"])
            if raw is None:
                continue
            header = decode_pool(raw)
            entries = []
            cursor = txn.cursor(db=store.db["entries"])
            if cursor.set_range(pool_key):
                for key, value in cursor:
                    if not bytes(key).startswith(pool_key):
                        break
                    e = decode_entry(value)
                    row = {"index": e.index, "tokens": int(e.token_ids.size), "answer": e.answer,
                           "finish_reason": e.finish_reason, "leaked": e.leaked, "k": e.k}
                    if tokenizer is not None:
                        row["text"] = tokenizer.decode(e.token_ids.tolist())
                    entries.append(row)
            pool = {"pool": pool_key.hex(), "kind": header.kind, "teacher": header.teacher,
                    "sampling": header.sampling, "ground_truth": header.ground_truth, "entries": entries}
            if tokenizer is not None:
                pool["prompt"] = tokenizer.decode(header.prompt_ids.tolist())
            out.append(pool)
    return out


def _drop_pools(store: LmdbStore, doomed: set[bytes]) -> int:
    """Delete pools, their entries and name rows in bounded transactions; returns entries removed."""
    removed = 0
    for db_name, pool_of in (("entries", lambda k: k[:POOL_KEY_BYTES]), ("names", lambda k: split_name_key(k)[1]),
                             ("pools", lambda k: k)):
        while True:
            def batch(txn: Any) -> int:
                n = 0
                cursor = txn.cursor(db=store.db[db_name])
                keys = [bytes(k) for k in cursor.iternext(keys=True, values=False) if pool_of(bytes(k)) in doomed]
                for key in keys[:GC_BATCH]:
                    txn.delete(key, db=store.db[db_name])
                    n += 1
                return n

            n = store.write(batch)
            if db_name == "entries":
                removed += n
            if n < GC_BATCH:
                break
    return removed


def gc(path: str | os.PathLike[str], keep_teacher: str) -> dict[str, Any]:
    """Drop every pool (and its entries) of a teacher other than ``keep_teacher``."""
    if not keep_teacher:
        raise ValueError("--keep-teacher: a teacher fingerprint is required (see `brts cache stats`)")
    with LmdbStore(path) as store:
        with store.read() as txn:
            headers = _pools(store, txn)
        teachers = {h.teacher for h in headers.values() if h is not None}
        if keep_teacher not in teachers and teachers:
            raise ValueError(f"--keep-teacher: {keep_teacher!r} has no pools here; teachers present: "
                             f"{', '.join(sorted(teachers))}")
        doomed = {k for k, h in headers.items() if h is None or h.teacher != keep_teacher}
        removed = _drop_pools(store, doomed)
    return {"pools_removed": len(doomed), "entries_removed": removed, "kept_teacher": keep_teacher}


def compact(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
            replace: bool = False) -> dict[str, Any]:
    """Copy into a fresh environment (LMDB files never shrink). ``replace`` swaps it in; stop the server first."""
    src = Path(path)
    dst = Path(out) if out is not None else src.with_name(src.name + ".compact")
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"--out: {dst} exists and is not empty; choose an empty or new directory")
    with LmdbStore(src, readonly=True) as store:
        before = store.disk_bytes()
        store.copy_compact(dst)
    after = sum(f.stat().st_size for f in dst.glob("*.mdb"))
    result = {"from": str(src), "to": str(dst), "bytes_before": before, "bytes_after": after}
    if replace:
        backup = src.with_name(f"{src.name}.old-{int(time.time())}")
        src.rename(backup)
        dst.rename(src)
        shutil.rmtree(backup)
        result["to"] = str(src)
    return result


def export_rows(path: str | os.PathLike[str], verifier: Any | None = None) -> Iterator[dict[str, Any]]:
    """One row per entry: pool, teacher, tier, index, prompt ids, caller's prompt ids, tokens, answer, flags.

    ``correct`` is judged against the pool's ground truth for Tier 2, and for Tier 1 against the ground truth
    recorded with the pool's first caller prompt id in byte order (correctness is per request, so this is one
    request's view; ``ground_truth`` says which; None when no request recorded one).
    """
    from brts.shared.verify import answers_correct_batch

    with LmdbStore(path, readonly=True) as store, store.read() as txn:
        headers = _pools(store, txn)
        names: dict[bytes, list[tuple[str, str]]] = defaultdict(list)
        for key, value in txn.cursor(db=store.db["names"]):
            name, pool = split_name_key(key)
            names[pool].append((name, bytes(value).decode(errors="replace")))
        for key, value in txn.cursor(db=store.db["entries"]):
            pool, index = split_entry_key(key)
            header = headers.get(pool)
            if header is None:
                continue
            e = decode_entry(value)
            truth = header.ground_truth or (names[pool][0][1] if names.get(pool) else "")
            correct = answers_correct_batch([e.answer], [truth], verifier)[0] if truth else None
            yield {
                "pool": pool.hex(), "teacher": header.teacher, "kind": header.kind, "tier": e.tier, "index": index,
                "prompt_names": [n for n, _ in names.get(pool, [])], "ground_truth": truth,
                "prompt_ids": header.prompt_ids.tolist(), "token_ids": e.token_ids.tolist(), "answer": e.answer,
                "correct": correct, "finish_reason": e.finish_reason, "leaked": e.leaked, "perturbed": e.perturbed,
                "topk_k": e.k, "sampling": json.dumps(header.sampling, sort_keys=True),
            }


def export(path: str | os.PathLike[str], out: str | os.PathLike[str], verifier: Any | None = None) -> dict[str, Any]:
    """Write ``export_rows`` to ``out``: ``.parquet`` or ``.jsonl`` (chosen by the suffix)."""
    dst = Path(out)
    if dst.suffix not in (".parquet", ".jsonl"):
        raise ValueError(f"OUT: {dst.name} must end in .parquet or .jsonl")
    rows = list(export_rows(path, verifier))
    tmp = dst.with_name(dst.name + ".partial")
    if dst.suffix == ".jsonl":
        with tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, dst)  # a crash never leaves a half-written export under the real name
    return {"rows": len(rows), "out": str(dst)}


__all__ = ["CacheError", "compact", "export", "export_rows", "gc", "inspect", "stats", "verify"]
