"""Writer process for the cache tests: opens a CandidateCache over the test doubles and fills it batch by batch.

Usage: writer.py CACHE_DIR --start N --batches B --batch-size S [--map-size BYTES] [--tokenizer-json FILE]
                 [--go-file FILE]

Prints ``READY <map_size>`` once the cache is open, then, after each get() returned (its one write transaction
committed), ``COMMITTED <first prompt number> <count> <digest> <entries drawn so far> <map_size>``, flushed, so a
parent that kills this process with SIGKILL knows which batches were durable before the kill.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import cache_proc_common as common  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from cache_doubles import make_pipeline  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

from brts.server.cache import CandidateCache  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache_dir")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--map-size", type=int, default=64 << 10)
    ap.add_argument("--tokenizer-json", default=None)
    ap.add_argument("--go-file", default=None)
    args = ap.parse_args()

    tok = common.load(args.tokenizer_json)
    sampling = common.sampling()
    cache = CandidateCache(args.cache_dir, common.TEACHER, make_pipeline(tok), map_size=args.map_size)
    print(f"READY {cache.store.map_size()}", flush=True)
    if args.go_file:
        deadline = time.monotonic() + 60
        while not os.path.exists(args.go_file):
            if time.monotonic() > deadline:
                sys.exit("writer: the go file never appeared")
            time.sleep(0.01)
    for b in range(args.batches):
        first = args.start + b * args.batch_size
        jobs = [common.prompt_job(tok, n) for n in range(first, first + args.batch_size)]
        served = cache.get(jobs, sampling, seed=common.SEED, k=common.K)
        print(f"COMMITTED {first} {args.batch_size} {common.digest(served)} {cache.generated} "
              f"{cache.store.map_size()}", flush=True)
    cache.close()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
