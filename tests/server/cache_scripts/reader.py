"""Reader process for the cache tests: re-reads the whole cache in snapshots while a writer fills it.

Usage: reader.py CACHE_DIR --map-size BYTES --n-tier1 N --ready-file FILE --stop-file FILE

Opens ``LmdbStore(CACHE_DIR, readonly=True)`` with a small map so that a writer growing the map makes this
process's transactions meet ``MapResizedError`` (counted by wrapping the store's ``_adopt_new_size``). Each pass
is one read transaction: every entry is decoded (so its checksum is checked), every entry must belong to a pool
header in the same snapshot, and every pool must hold exactly N entries, indices 0..N-1 (a writer's batch is one
transaction, so a snapshot never shows half of one). Touches READY_FILE after the first pass and stops after the
first full pass that began once STOP_FILE existed. Prints one JSON line per changed entry count and a final
``SUMMARY {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from brts.server.cache.codec import CorruptEntryError, decode_entry, decode_pool
from brts.server.cache.keys import split_entry_key
from brts.server.cache.store import LmdbStore


def one_pass(store: LmdbStore, n_tier1: int) -> dict:
    corrupt, torn = [], []
    with store.read(buffers=True) as txn:
        pools = {}
        for key, value in txn.cursor(db=store.db["pools"]):
            try:
                pools[bytes(key)] = decode_pool(value)
            except CorruptEntryError as exc:
                corrupt.append(str(exc))
        per_pool: dict[bytes, list[int]] = defaultdict(list)
        entries = 0
        for key, value in txn.cursor(db=store.db["entries"]):
            pool, index = split_entry_key(key)
            try:
                entry = decode_entry(value, f"entry {bytes(key).hex()}")
            except CorruptEntryError as exc:
                corrupt.append(str(exc))
                continue
            if entry.index != index or entry.topk is None or entry.topk.length != entry.token_ids.size:
                corrupt.append(f"entry {bytes(key).hex()}: decoded fields disagree with its key")
            entries += 1
            per_pool[pool].append(index)
        names = txn.stat(store.db["names"])["entries"]
    for pool, indices in per_pool.items():
        if pool not in pools:
            torn.append(f"entry of pool {pool.hex()} without its header")
        elif sorted(indices) != list(range(n_tier1)):
            torn.append(f"pool {pool.hex()} holds indices {sorted(indices)}")
    for pool in pools:
        if pool not in per_pool:
            torn.append(f"pool {pool.hex()} without entries")
    if names != len(pools):
        torn.append(f"{names} name rows for {len(pools)} pools")
    return {"entries": entries, "pools": len(pools), "corrupt": corrupt, "torn": torn}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache_dir")
    ap.add_argument("--map-size", type=int, required=True)
    ap.add_argument("--n-tier1", type=int, required=True)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--stop-file", required=True)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    args = ap.parse_args()

    store = LmdbStore(args.cache_dir, readonly=True, map_size=args.map_size)
    resized = 0
    adopt = store._adopt_new_size

    def counted_adopt() -> None:
        nonlocal resized
        resized += 1
        adopt()

    store._adopt_new_size = counted_adopt  # type: ignore[method-assign]
    first_map = store.map_size()
    counts: list[int] = []
    problems: Counter[str] = Counter()
    examples: list[str] = []
    passes = 0
    deadline = time.monotonic() + args.max_seconds
    while True:
        stopping = os.path.exists(args.stop_file)
        result = one_pass(store, args.n_tier1)
        passes += 1
        for kind in ("corrupt", "torn"):
            problems[kind] += len(result[kind])
            examples.extend(result[kind][:3])
        if not counts or counts[-1] != result["entries"]:
            counts.append(result["entries"])
            print(json.dumps({"pass": passes, "entries": result["entries"], "pools": result["pools"],
                              "map_size": store.map_size(), "resized": resized}), flush=True)
        if passes == 1:
            Path(args.ready_file).touch()
        if stopping or time.monotonic() > deadline:
            break
        time.sleep(0.002)  # leave the writer some CPU on a small machine
    summary = {"passes": passes, "counts": counts, "resized": resized, "first_map_size": first_map,
               "map_size": store.map_size(), "corrupt": problems["corrupt"], "torn": problems["torn"],
               "examples": examples[:10], "timed_out": not stopping}
    store.close()
    print("SUMMARY " + json.dumps(summary), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
