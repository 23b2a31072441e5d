"""Candidate-cache read speed and size: decode vs a raw LMDB read, and bytes per token on real candidates.

Why: a training step's candidates are served from the LMDB cache once it is warm, so its read path must not
be what the trainer waits on, and its values (checksummed zstd over byte-planed arrays, float16 log-probs)
must stay well under the ~100 B/token of the raw arrays at K=16. Two measurements, printed as tables:

(i)  read speed, one process, warm cache: 64 prompts × 4 candidates × 4,096 tokens at K=16 (100 MiB of decoded
     payload), written first with synthetic teacher-like top-K (ids drawn from a Zipf-like distribution over the
     151,936 Qwen2.5 ids, the sampled token usually the top-1, sorted descending float16 log-probs with a
     confident top-1) through ``CandidateCache`` with a test-double pipeline, so the keys are the real ones.
     Timed, each the median of ``--repeats`` runs after one warm-up: the raw LMDB read of the value bytes
     (``txn.get`` copying to ``bytes``), read + ``decode_entry`` (zero-copy buffers), ``decode_entry`` alone from
     bytes in memory (and its checksum and zstd parts), and ``CandidateCache.get(..., generate=False)``, the
     real serving read path (read, decode, judge, slice). Throughput is MB/s of decoded payload (token ids +
     top-K ids + log-probs as served); the last column is each path's time over the raw read's.
(ii) size on the toy teacher's real candidates: ``--problems`` toy problems × ``--samples`` candidates drawn
     through ``CandidateCache`` with the hf engine (fp32, CPU) and scored at K=16, stored once with float16 and
     once with float32 log-probs (the second replays the first one's draws, so both hold the same candidates):
     value bytes per token (``entries`` database) and ``data.mdb`` bytes per token after
     ``env.copy(compact=True)``.

    .venv/bin/python bench/bench_cache.py                                  # both parts (~1.5 min)
    .venv/bin/python bench/bench_cache.py --part read --repeats 7          # (i) only
    .venv/bin/python bench/bench_cache.py --part size --toy-teacher DIR    # (ii) on a fitted toy teacher folder

Without ``--toy-teacher`` part (ii) uses ``.pytest_cache/d/toy-teacher`` when the tests have fitted it, else
fits one into ``$TMPDIR/brts-bench-toy-teacher`` (reused by later runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _rows import Row, emit
except ImportError:  # pragma: no cover
    from bench._rows import Row, emit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 151_936
MB = 1e6
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------- (i) synthetic


def zipf_ids(rng: np.random.Generator, rows: int, k: int, vocab: int = VOCAB, s: float = 1.1,
             offset: float = 2.7) -> np.ndarray:
    """int32 [rows, k]: k distinct ids per row, drawn from p(id) ∝ (id + offset)^-s (low ids are the frequent
    ones, as in a BPE vocabulary), in random order within the row (a row's order follows its log-probs)."""
    weights = (np.arange(vocab, dtype=np.float64) + offset) ** -s
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    draws = np.searchsorted(cdf, rng.random((rows, 3 * k))).astype(np.int64)
    draws.sort(axis=1)
    dup = np.zeros_like(draws, dtype=bool)
    dup[:, 1:] = draws[:, 1:] == draws[:, :-1]
    draws[dup] = vocab + np.arange(int(dup.sum()))  # push repeats past the end, keep the first k distinct
    draws.sort(axis=1)
    ids = draws[:, :k]
    short = ids >= vocab  # a row with fewer than k distinct draws: fill with uniform ids (rare, may collide)
    ids[short] = rng.integers(0, vocab, int(short.sum()))
    order = np.argsort(rng.random((rows, k)), axis=1)
    return np.take_along_axis(ids, order, axis=1).astype(np.int32)


def teacher_logprobs(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """float16 [rows, k], each row sorted descending: a confident top-1 (p ~ Beta(6, 1)), the runner-up taking a
    share of the rest, then gaps of ~0.7 nats (exponential), as in a reasoning model's T=1 top-K."""
    p1 = rng.beta(6.0, 1.0, rows)
    lp = np.empty((rows, k), dtype=np.float64)
    lp[:, 0] = np.log(p1)
    lp[:, 1] = np.log(np.maximum((1 - p1) * rng.beta(5.0, 2.0, rows), 1e-30))
    lp[:, 2:] = lp[:, 1:2] - np.cumsum(rng.exponential(0.7, (rows, k - 2)), axis=1)
    lp = np.minimum.accumulate(np.minimum(lp, 0.0), axis=1)
    return lp.astype(np.float16)


class SyntheticPipeline:
    """The ``CandidatePipeline`` surface the cache uses (draw, score, verifier, keep_leaked), with synthetic
    teacher-like candidates of exactly ``tokens`` tokens and top-K rows, deterministic in the seeds."""

    verifier = None
    keep_leaked = False

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self._topk: dict[tuple[int, ...], Any] = {}

    def draw(self, draws: Sequence[Any], sampling: Any, k: int | None = None) -> list[list[Any]]:
        from brts.server.pipeline import CandidateRecord
        from brts.shared.topk import TopK

        out = []
        for d in draws:
            records = []
            for index, seed in zip(d.indices, d.seeds):
                rng = np.random.default_rng(seed)
                ids = zipf_ids(rng, self.tokens, 16)
                lps = teacher_logprobs(rng, self.tokens, 16)
                pick = np.where(rng.random(self.tokens) < 0.85, 0, rng.integers(1, 4, self.tokens))
                tokens = tuple(int(t) for t in ids[np.arange(self.tokens), pick])
                answer = d.job.ground_truth if rng.random() < 0.5 else "0"
                self._topk[tokens] = TopK(ids, lps.astype(np.float32))
                records.append(CandidateRecord(d.tier, index, tokens, "length", "", answer))
            out.append(records)
        return out

    def score(self, pairs: Sequence[tuple[Sequence[int], Any]], k: int | None = None) -> None:
        for _, record in pairs:
            topk = self._topk[record.token_ids]
            record.topk = topk if k is None or k >= topk.k else topk.slice_k(k)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench_read(args: argparse.Namespace) -> None:
    from brts.server.cache import CandidateCache
    from brts.server.cache.codec import _ENVELOPE, MAGIC_ENTRY, _open, checksum, decode_entry
    from brts.server.cache.keys import entry_key, pool_address, sampling_key
    from brts.server.pipeline import PromptJob
    from brts.shared.engines.base import SamplingParams

    k, tokens = 16, args.tokens
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=tokens)
    rng = np.random.default_rng(0)
    jobs = [PromptJob(f"bench-{p}", tuple(int(t) for t in rng.integers(0, VOCAB, 200)), str(p), n_tier1=args.samples)
            for p in range(args.prompts)]
    teacher = "teacher-bench"
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        t0 = time.perf_counter()
        pipe: Any = SyntheticPipeline(tokens)
        with CandidateCache(Path(tmp) / "cache", teacher, pipe, store_k=k, logprob_dtype=args.logprob_dtype) as cache:
            cache.get(jobs, sampling, seed=0, k=k)
            write_s = time.perf_counter() - t0
            samp = sampling_key(sampling, 0)
            keys = [entry_key(pool_address("tier1", teacher, j.prompt_ids, samp).key, i)
                    for j in jobs for i in range(j.n_tier1)]
            store, db = cache.store, cache.store.db["entries"]

            def raw_read() -> list[bytes]:
                with store.read() as txn:
                    return [txn.get(key, db=db) for key in keys]

            def read_decode() -> list[Any]:
                with store.read(buffers=True) as txn:
                    return [decode_entry(txn.get(key, db=db)) for key in keys]

            def serve() -> list[Any]:
                return cache.get(jobs, sampling, seed=0, k=k, generate=False)

            t_raw, values = timed(raw_read, args.repeats)
            t_read_decode, entries = timed(read_decode, args.repeats)
            t_decode, _ = timed(lambda: [decode_entry(v) for v in values], args.repeats)
            t_open, _ = timed(lambda: [_open(MAGIC_ENTRY, v, "entry") for v in values], args.repeats)
            t_sum, _ = timed(lambda: [checksum(memoryview(v)[_ENVELOPE.size :]) for v in values], args.repeats)
            t_serve, served = timed(serve, args.repeats)
    value_bytes = sum(len(v) for v in values)
    lp_size = np.dtype(args.logprob_dtype).itemsize
    payload = sum(e.token_ids.nbytes + e.topk.ids.nbytes + e.topk.logprobs.nbytes for e in entries)
    n_tokens = sum(e.token_ids.size for e in entries)
    assert payload == n_tokens * (4 + k * (4 + lp_size))
    assert sum(len(p.candidates) for p in served) == len(keys) and all(p.missing == 0 for p in served)
    assert all(c.topk.logprobs.dtype == np.dtype(args.logprob_dtype) for p in served for c in p.candidates)

    print(f"(i) warm read: {args.prompts} prompts x {args.samples} candidates x {tokens} tokens, K={k}, "
          f"{args.logprob_dtype} log-probs; {len(keys)} values, {value_bytes / MB:.1f} MB stored "
          f"({value_bytes / n_tokens:.1f} B/token, {payload / value_bytes:.2f}x smaller than the "
          f"{payload / MB:.1f} MB decoded payload); written in {write_s:.1f} s; median of {args.repeats}")
    rows = [
        ("raw LMDB read (txn.get, bytes copy)", t_raw),
        ("read + decode_entry (zero-copy buffers)", t_read_decode),
        ("CandidateCache.get(generate=False)", t_serve),
        ("decode_entry alone (values in memory)", t_decode),
        ("  of which checksum + zstd decompress", t_open),
        ("  of which checksum (blake2b-64)", t_sum),
    ]
    print(f"{'path':42s} {'ms':>9s} {'payload MB/s':>13s} {'stored MB/s':>12s} {'x raw time':>11s}")
    for name, t in rows:
        print(f"{name:42s} {t * 1e3:9.1f} {payload / MB / t:13.0f} {value_bytes / MB / t:12.0f} {t / t_raw:11.1f}")
    print(f"ratios: decoded/raw throughput (payload MB/s over the raw read's payload-equivalent MB/s): "
          f"read+decode {t_raw / t_read_decode:.3f}, CandidateCache.get {t_raw / t_serve:.3f}, "
          f"decode alone {t_raw / t_decode:.3f}")
    size = f"{args.prompts}x{args.samples}x{tokens}, K={k}"
    emit(*(Row("cache", f"warm read payload MB/s ({size})", f"{name} vs raw LMDB read", t_raw / t, None,
               f"{payload / MB / t:,.0f} vs {payload / MB / t_raw:,.0f} MB/s",
               {"path_ms": t * 1e3, "raw_ms": t_raw * 1e3, "payload_mb": payload / MB})
           for name, t in (("read + decode_entry", t_read_decode), ("CandidateCache.get", t_serve))))


# ---------------------------------------------------------------------------------------------------- (ii) real


def toy_teacher_dir(arg: Path | None) -> Path:
    from brts.toy import fit_toy_model

    if arg is not None:
        folder = arg
    elif (REPO / ".pytest_cache/d/toy-teacher/toy_fit.json").exists():
        folder = REPO / ".pytest_cache/d/toy-teacher"
    else:
        folder = Path(tempfile.gettempdir()) / "brts-bench-toy-teacher"
        print(f"fitting the toy teacher into {folder} (about a minute, once) ...", flush=True)
    return fit_toy_model(folder, quality="teacher")  # returns at once when the folder holds this fit


class ReplayDraws:
    """Wraps a ``CandidatePipeline``: the first ``draw`` of a set of draws runs the engine, a repeat replays it
    (fresh records, no top-K), so two caches can store the very same candidates; scoring is always real."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.verifier, self.keep_leaked = pipeline.verifier, pipeline.keep_leaked
        self._memo: dict[tuple, list[Any]] = {}

    def draw(self, draws: Sequence[Any], sampling: Any = None, k: int | None = None) -> list[list[Any]]:
        todo = [d for d in draws if self._key(d) not in self._memo]
        for d, records in zip(todo, self.pipeline.draw(todo, sampling, k) if todo else []):
            self._memo[self._key(d)] = records
        return [[dataclasses.replace(r, topk=None) for r in self._memo[self._key(d)]] for d in draws]

    def score(self, pairs: Sequence[tuple[Sequence[int], Any]], k: int | None = None) -> None:
        self.pipeline.score(pairs, k)

    @staticmethod
    def _key(d: Any) -> tuple:
        return (d.job.prompt_ids, d.job.ground_truth, d.tier, d.indices, d.seeds, d.perturbed)


def bench_size(args: argparse.Namespace) -> None:
    from brts.server.cache import CandidateCache, LmdbStore
    from brts.server.cache.codec import decode_entry
    from brts.server.fingerprint import teacher_fingerprint
    from brts.server.pipeline import CandidatePipeline, PromptJob
    from brts.shared.engines.base import SamplingParams
    from brts.shared.engines.hf import HFEngine
    from brts.shared.tokenizer import load_tokenizer
    from brts.toy import make_problems, toy_prompt_spec

    k = 16
    folder = toy_teacher_dir(args.toy_teacher)
    tokenizer = load_tokenizer(folder)
    engine = HFEngine.from_pretrained(folder, device="cpu", dtype="float32")
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    spec = toy_prompt_spec(tokenizer)
    unique = {p.problem: p for p in reversed(make_problems(4 * args.problems, seed=3))}  # first of each text
    problems = sorted(unique.values(), key=lambda p: int(p.id.rsplit("-", 1)[1]))[: args.problems]
    jobs = [PromptJob(p.id, tuple(spec.encode(p.problem)), p.answer, n_tier1=args.samples) for p in problems]
    pipe: Any = ReplayDraws(CandidatePipeline(engine, engine.scorer(), tokenizer, sampling, logprob_k=k))
    teacher = teacher_fingerprint(folder, tokenizer)
    rows, token_ids = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-cache-size-") as tmp:
        for dtype in ("float16", "float32"):
            path = Path(tmp) / dtype
            t0 = time.perf_counter()
            with CandidateCache(path, teacher, pipe, store_k=k, logprob_dtype=dtype) as cache:
                served = cache.get(jobs, sampling, seed=0, k=k)
                seconds = time.perf_counter() - t0
                token_ids[dtype] = [c.token_ids.tobytes() for p in served for c in p.candidates]
                cache.store.copy_compact(Path(tmp) / f"{dtype}-compact")
                value_bytes = tokens = n = 0
                with cache.store.read() as txn:
                    for _, value in txn.cursor(db=cache.store.db["entries"]):
                        entry = decode_entry(value)
                        assert entry.topk is not None and entry.k == k
                        value_bytes, tokens, n = value_bytes + len(value), tokens + entry.token_ids.size, n + 1
            mdb = (Path(tmp) / f"{dtype}-compact" / "data.mdb").stat().st_size
            with LmdbStore(Path(tmp) / f"{dtype}-compact") as compact, compact.read() as txn:
                kinds = ("branch_pages", "leaf_pages", "overflow_pages")
                pages = {name: sum(txn.stat(compact.db[name])[f] for f in kinds) for name in compact.db}
                page_size = txn.stat(compact.db["entries"])["psize"]
            raw = 4 + k * (4 + np.dtype(dtype).itemsize)
            rows.append((dtype, n, tokens, seconds, value_bytes / tokens, mdb / tokens, raw, pages, mdb // page_size))
    engine.close()
    assert token_ids["float16"] == token_ids["float32"]  # the same candidates in both caches

    print(f"(ii) toy teacher {folder} ({teacher}): {args.problems} problems x {args.samples} candidates, "
          f"T=1.0, max_new_tokens {args.max_new_tokens}, K={k}, hf engine fp32 CPU")
    print(f"{'log-probs':10s} {'entries':>8s} {'tokens':>7s} {'tok/entry':>9s} {'value B/tok':>12s} "
          f"{'data.mdb B/tok':>15s} {'raw B/tok':>10s} {'raw/value':>10s} {'time s':>7s}")
    for dtype, n, tokens, seconds, per_value, per_mdb, raw, _, _ in rows:
        label = f"{seconds:7.1f}" if dtype == "float16" else f"{seconds:7.1f}*"
        print(f"{dtype:10s} {n:8d} {tokens:7d} {tokens / n:9.1f} {per_value:12.1f} {per_mdb:15.1f} {raw:10d} "
              f"{raw / per_value:10.2f} {label}")
    print("(* replayed draws: the time is scoring + encoding + the commit; data.mdb after env.copy(compact=True) "
          "also holds the pool headers, the name index and LMDB's page overhead)")
    for dtype, *_, pages, total in rows:
        per_db = ", ".join(f"{name} {n}" for name, n in pages.items())
        print(f"data.mdb pages ({dtype}): {total} of {page_size} B; {per_db}, "
              f"other (meta, main db, free) {total - sum(pages.values())}")
    f16, f32 = rows[0][4], rows[1][4]
    print(f"ratio: float32/float16 value bytes {f32 / f16:.2f}")
    _, n, tokens, _, per_value, per_mdb, raw, _, _ = rows[0]
    emit(Row("cache", f"stored value bytes/token, toy teacher, K={k} (goal <= 60 B/token)",
             "float16 values vs raw arrays", per_value / raw, "<= 0.60", f"{per_value:.1f} vs {raw} B/token",
             {"value_b_per_token": per_value, "raw_b_per_token": raw, "data_mdb_b_per_token": per_mdb,
              "entries": n, "tokens": tokens, "float32_value_b_per_token": f32}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--part", choices=("read", "size", "both"), default="both")
    ap.add_argument("--prompts", type=int, default=64, help="(i) prompts (default 64)")
    ap.add_argument("--samples", type=int, default=4, help="candidates per prompt, (i) and (ii) (default 4)")
    ap.add_argument("--tokens", type=int, default=4096, help="(i) tokens per candidate (default 4096)")
    ap.add_argument("--logprob-dtype", choices=("float16", "float32"), default="float16",
                    help="(i) stored log-prob dtype (default float16, the cache's default)")
    ap.add_argument("--repeats", type=int, default=5, help="(i) timed repeats after one warm-up (default 5)")
    ap.add_argument("--toy-teacher", type=Path, help="(ii) a fitted toy teacher folder (default: see below)")
    ap.add_argument("--problems", type=int, default=64, help="(ii) toy problems (default 64)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="(ii) default 24")
    args = ap.parse_args(argv)
    if args.part in ("read", "both"):
        bench_read(args)
    if args.part == "both":
        print()
    if args.part in ("size", "both"):
        bench_size(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
