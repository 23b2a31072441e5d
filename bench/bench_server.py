"""Teacher-server overhead: the gRPC path against the same work done in one process, side by side in one run.

Why: a trainer talks to ``brts serve`` over gRPC, so what the server adds on top of the cache and the engine
(building the messages, the wire, the client's decode, the coalescing batchers) must stay small next to the
work itself (issue #5's targets). Three measurements, each against its in-process twin in the same run, with
the timed repeats of the two sides interleaved, reported as medians:

(1) hit path: GetCandidates for 64 prompts × 4 cached candidates × 4,096 tokens at K=16 over loopback (a real
    in-process gRPC server, ``RunningServer`` + ``TeacherClient``), against ``cache.get(..., generate=False)``
    on the runtime's own cache object (LMDB cannot open one folder twice in a process), the same read + decode
    + judge + slice the server does before building its messages. The entries are written first through the
    real ``CandidatePipeline`` and ``CandidateCache`` around test doubles at the engine boundary: an engine that
    returns 4,095 deterministic Zipf-like tokens + EOS per seed (vocab 151,936) and a scorer that returns
    teacher-like top-K (sorted descending log-probs with a confident top-1, ids Zipf-like over the vocab, the
    sampled token usually the top-1). Payload MB/s counts the decoded arrays (token ids int32 + top-K ids int32
    + log-probs float16 = 100 B/token at K=16); the ratio is the server's throughput over the direct read's,
    goal >= 0.5. Rows below it split the server-side cost (message build, serialize, parse + decode).
(2) miss path: candidates/s through the server against the same engine called directly, on a tiny random
    Qwen2 (vocab 151,936, hidden 64, 2 layers, fp32) with the hf engine, scored at K=16. The server is
    ``build_runtime`` + ``RunningServer`` on a fresh cache; the direct side is ``CandidateCache.get`` on a
    second fresh cache folder over the runtime's own pipeline (the same engine object). Round r asks both sides
    for pool window [4r, 4r + 4), so every round is all misses and both sides draw the very same seeds; the
    candidates they return are compared. Goal: ratio >= 0.9.
(3) Score under load: 4 clients (threads, each its own ``TeacherClient``) each scoring 8 sequences of 2,048
    tokens with K=16 candidate ids per response position, against one client alone scoring its 8: aggregate
    response positions/s and the scaling ratio (aggregate with 4 / alone), on the same tiny-model server.

Default sizes fit ~2 minutes on 2 CPU cores, where the 151,936-wide LM head and sampler cost ~20 ms per
generated token per row and ~4 ms per scored position: (2) runs 4 prompts × 4 samples × 32 new tokens and (3)
scores the last 128 positions of each 2,048-token sequence; the last line below runs issue #5's sizes on a GPU:

    .venv/bin/python bench/bench_server.py                           # all three parts, CPU defaults
    .venv/bin/python bench/bench_server.py --part hit --repeats 7     # one part
    .venv/bin/python bench/bench_server.py --device cuda --miss-prompts 16 --new-tokens 64 --score-prompt-len 256

Everything runs in one process: the server's worker threads and the clients share the interpreter (and its
GIL) and the machine's cores, as they would not across machines, so the ratios are a conservative bound. The
direct side runs on a worker thread, as the server's work does, and the script re-runs itself with
MALLOC_ARENA_MAX=1 (``--malloc-arena-max``): on CPU the speed of the same torch work otherwise depended on which
thread ran it (glibc arenas; OpenMP teams on a loaded machine), which would show up as a server/direct ratio
that is not the server's. Parts (2) and (3) also print the time the server spent inside its cache/scorer call,
so the overhead the server adds is read directly, whatever the engine's speed did meanwhile.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _rows import Row, emit
except ImportError:  # pragma: no cover
    from bench._rows import Row, emit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Writing model shards" / "Loading weights" bars

VOCAB = 151_936
FIRST_SPECIAL = 151_643  # ids from here on are special tokens of the Qwen2.5 tokenizer
MB = 1e6


# ---------------------------------------------------------------------------------------------------- helpers


def zipf_weights_cdf(vocab: int, s: float = 1.1, offset: float = 2.7) -> np.ndarray:
    """CDF of p(id) ∝ (id + offset)^-s: low ids are the frequent ones, as in a BPE vocabulary."""
    cdf = np.cumsum((np.arange(vocab, dtype=np.float64) + offset) ** -s)
    return cdf / cdf[-1]


_CDF_VOCAB = zipf_weights_cdf(VOCAB)
_CDF_TEXT = zipf_weights_cdf(FIRST_SPECIAL)


def zipf_ids(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """int32 [rows, k]: k distinct Zipf-like ids per row over the whole vocabulary, in random order."""
    draws = np.searchsorted(_CDF_VOCAB, rng.random((rows, 3 * k))).astype(np.int64)
    draws.sort(axis=1)
    dup = np.zeros_like(draws, dtype=bool)
    dup[:, 1:] = draws[:, 1:] == draws[:, :-1]
    draws[dup] = VOCAB + np.arange(int(dup.sum()))  # push repeats past the end, keep the first k distinct
    draws.sort(axis=1)
    ids = draws[:, :k]
    short = ids >= VOCAB  # fewer than k distinct draws (rare): uniform fill
    ids[short] = rng.integers(0, VOCAB, int(short.sum()))
    order = np.argsort(rng.random((rows, k)), axis=1)
    return np.take_along_axis(ids, order, axis=1).astype(np.int32)


def teacher_logprobs(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """float32 [rows, k], rows sorted descending: a confident top-1 (p ~ Beta(6, 1)), a runner-up taking a share
    of the rest, then gaps of ~0.7 nats, as in a reasoning model's T=1 top-K."""
    p1 = rng.beta(6.0, 1.0, rows)
    lp = np.empty((rows, k), dtype=np.float64)
    lp[:, 0] = np.log(p1)
    lp[:, 1] = np.log(np.maximum((1 - p1) * rng.beta(5.0, 2.0, rows), 1e-30))
    lp[:, 2:] = lp[:, 1:2] - np.cumsum(rng.exponential(0.7, (rows, k - 2)), axis=1)
    lp = np.minimum.accumulate(np.minimum(lp, 0.0), axis=1)
    return lp.astype(np.float16).astype(np.float32)  # float16-representable: the cache stores float16


def timed_pair(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[list[float], list[float], Any, Any]:
    """One untimed warm-up call of each, then ``repeats`` timed rounds, the order alternating per round."""
    ra, rb = a(), b()
    ta: list[float] = []
    tb: list[float] = []
    for r in range(repeats):
        for fn, times, first in ((a, ta, True), (b, tb, False)) if r % 2 == 0 else ((b, tb, False), (a, ta, True)):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            if first:
                ra = out
            else:
                rb = out
    return ta, tb, ra, rb


_DIRECT = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-direct")


def off_main(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run on one persistent worker thread, as the server runs its work (gRPC handlers, the coalescer):
    on CPU, torch's intra-op threads behave differently from the main thread (hf generation from the main thread
    measured 4-5x slower than from a worker on a loaded 2-core machine), which is not the server's overhead."""
    return lambda: _DIRECT.submit(fn).result()


def time_batcher(coalescer: Any) -> list[float]:
    """Wrap a server batcher's run function (bench instrumentation, nothing else changes): the list gets the
    seconds of every group it runs, i.e. the time the server spends inside the cache or the scorer."""
    spans: list[float] = []
    run = coalescer._run

    def timed(key: Any, items: list[Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return run(key, items)
        finally:
            spans.append(time.perf_counter() - t0)

    coalescer._run = timed
    return spans


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float], ms: bool = True) -> str:
    """'min-max' of ``xs`` seconds, in ms (or in s with two decimals)."""
    lo, hi = (f"{min(xs) * 1e3:.0f}", f"{max(xs) * 1e3:.0f}") if ms else (f"{min(xs):.2f}", f"{max(xs):.2f}")
    return f"{lo}-{hi}"


# ---------------------------------------------------------------------------------------------------- (1) hit path


class FixedLengthEngine:
    """``GenerationEngine`` double: per seed, ``tokens - 1`` deterministic Zipf-like text ids, then EOS."""

    name = "bench-fixed"
    vocab_size = VOCAB

    def __init__(self, tokens: int, eos: int, max_context: int) -> None:
        self.tokens, self.eos, self.max_context = tokens, eos, max_context
        self.eos_token_ids = (eos,)
        self.samples = 0

    def generate(self, requests: Sequence[Any], sampling: Any) -> list[list[Any]]:
        from brts.shared.engines.base import Generation

        out = []
        for req in requests:
            gens = []
            for seed in req.seeds:
                rng = np.random.default_rng(seed)
                body = np.searchsorted(_CDF_TEXT, rng.random(self.tokens - 1))
                gens.append(Generation(tuple(body.tolist()) + (self.eos,), "stop"))
                self.samples += 1
            out.append(gens)
        return out

    def close(self) -> None:
        pass


class TeacherLikeScorer:
    """``Scorer`` double: sorted teacher-like top-K per response position, deterministic in the sequence; the
    token actually next is the top-1 in 85% of rows and ranks 2-4 otherwise (as sampled text mostly is)."""

    vocab_size = VOCAB

    def __init__(self, max_context: int) -> None:
        self.max_context = max_context

    def score(self, items: Sequence[Any], k: int) -> list[Any]:
        from brts.shared.engines.base import ScoreOutput
        from brts.shared.topk import TopK

        outs = []
        for item in items:
            seq = np.asarray(item.token_ids, dtype=np.int64)
            seed = int.from_bytes(hashlib.blake2b(seq.tobytes(), digest_size=8).digest(), "little")
            rng = np.random.default_rng(seed)
            nxt = seq[item.response_start:]
            rows = nxt.size
            ids = zipf_ids(rng, rows, k)
            pick = np.where(rng.random(rows) < 0.85, 0, rng.integers(1, min(4, k), rows))
            at = np.arange(rows)
            eq = ids == nxt[:, None]
            has = eq.any(axis=1)
            col = eq.argmax(axis=1)
            ids[at[has], col[has]] = ids[at[has], pick[has]]  # keep the row's ids distinct: swap, then place
            ids[at, pick] = nxt
            outs.append(ScoreOutput(TopK(ids, teacher_logprobs(rng, rows, k)), None))
        return outs


def hit_runtime(folder: Path, args: argparse.Namespace) -> Any:
    """A ``TeacherRuntime`` around the doubles, with the real pipeline, verifier and cache."""
    from brts.server.cache import CandidateCache
    from brts.shared.engines.base import SamplingParams
    from brts.server.pipeline import CandidatePipeline
    from brts.server.runtime import TeacherRuntime
    from brts.shared.config import ServerConfig, load_config
    from brts.shared.tokenizer import load_tokenizer, tokenizer_fingerprint
    from brts.shared.verify import BoundedVerifier

    teacher = "teacher-bench-hit"
    tokenizer = load_tokenizer("qwen2.5-instruct")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = load_config(
        ServerConfig, None,
        [f"sampling.max_new_tokens={args.hit_tokens}", "sampling.temperature=1.0", "sampling.top_p=1.0",
         f"max_logprob_k={args.k}"],
        model=str(folder), cache_dir=str(folder / "cache"), port=0)
    max_context = args.hit_tokens + args.prompt_len + 16
    engine, scorer = FixedLengthEngine(args.hit_tokens, eos, max_context), TeacherLikeScorer(max_context)
    s = config.sampling
    sampling = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens)
    pipeline = CandidatePipeline(engine, scorer, tokenizer, sampling, logprob_k=config.max_logprob_k,
                                 verifier=BoundedVerifier())
    cache = CandidateCache(config.cache_dir, teacher, pipeline, store_k=config.max_logprob_k)
    return TeacherRuntime(config, engine, scorer, tokenizer, teacher, tokenizer_fingerprint(tokenizer), cache, pipeline)


def make_prompts(n: int, samples: int, length: int, seed: int, offset: int = 0) -> tuple[list[Any], list[Any]]:
    """The same prompts as client ``Prompt``s and as cache ``PromptJob``s (random text ids, fixed length)."""
    from brts.server.pipeline import PromptJob
    from brts.shared.client import Prompt

    rng = np.random.default_rng(seed)
    ids = [tuple(int(t) for t in rng.integers(0, FIRST_SPECIAL, length)) for _ in range(n)]
    prompts = [Prompt(f"p{i}", ids[i], str(i), n_tier1=samples, pool_offset=offset) for i in range(n)]
    jobs = [PromptJob(f"p{i}", ids[i], str(i), n_tier1=samples, pool_offset=offset) for i in range(n)]
    return prompts, jobs


def bench_hit(args: argparse.Namespace) -> dict[str, float]:
    from brts.proto import teacher_pb2
    from brts.server.app import RunningServer
    from brts.server.service import reply_for
    from brts.server.wire import serialize_reply
    from brts.shared.client import TeacherClient, _candidates

    k = args.k
    prompts, jobs = make_prompts(args.hit_prompts, args.samples, args.prompt_len, seed=1)
    with tempfile.TemporaryDirectory(prefix="bench-server-hit-") as tmp:
        runtime = hit_runtime(Path(tmp), args)
        running = None
        try:
            sampling, seed = runtime.default_sampling, runtime.config.sampling.seed
            t0 = time.perf_counter()
            filled = runtime.cache.get(jobs, sampling, seed, k)
            fill_s = time.perf_counter() - t0
            assert runtime.cache.generated == len(jobs) * args.samples, runtime.cache.generated
            assert all(len(p.candidates) == args.samples for p in filled)
            running = RunningServer(runtime.config, window_s=args.window_ms / 1000).start().attach(runtime)
            client = TeacherClient(running.address)

            def direct() -> list[Any]:
                return runtime.cache.get(jobs, sampling, seed, k, generate=False)

            def served() -> list[Any]:
                return list(client.get_candidates(prompts, logprob_k=k))

            t_direct, t_server, got_direct, got_server = timed_pair(off_main(direct), served, args.repeats)
            # where the server's time goes: each step alone, on one thread, no wire
            snapshot = direct()
            msgs: list[Any] = []
            wire: list[bytes] = []

            def build() -> None:  # what the server yields for brts.shared.client (packed tokens, pre-encoded)
                msgs[:] = [reply_for(s, packed_tokens=True) for s in snapshot]

            def serialize() -> None:
                wire[:] = [serialize_reply(m) for m in msgs]

            def parse() -> list[Any]:
                return [_candidates(teacher_pb2.PromptCandidates.FromString(b)) for b in wire]

            pieces = {}
            for name, fn in (("reply_for x prompts (server build + encode)", build),
                             ("serialize_reply (gRPC's, server side)", serialize),
                             ("FromString + client decode (_candidates)", parse)):
                run = off_main(fn)
                run()
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t0)
                pieces[name] = med(times)
            client.close()
        finally:
            if running is not None:
                running.stop(grace_s=5)
            else:
                runtime.close()

    # the server must have served exactly what the cache holds
    by_id = {p.prompt_id: p for p in got_server}
    assert len(by_id) == len(jobs) and all(p.cache_hit and p.missing == 0 for p in got_server)
    tokens = 0
    for d in got_direct:
        s = by_id[d.prompt_id]
        assert len(s.candidates) == len(d.candidates) == args.samples
        for cd, cs in zip(d.candidates, s.candidates):
            assert np.array_equal(cd.token_ids, cs.token_ids) and np.array_equal(cd.topk.ids, cs.topk_ids)
            assert cs.topk_logprobs.dtype == cd.topk.logprobs.dtype
            assert np.array_equal(cd.topk.logprobs, cs.topk_logprobs)
            tokens += cd.token_ids.size
    payload = sum(c.token_ids.nbytes + c.topk.ids.nbytes + c.topk.logprobs.nbytes
                  for d in got_direct for c in d.candidates)
    wire_bytes = sum(p.wire_bytes for p in got_server)
    md, ms = med(t_direct), med(t_server)
    print(f"(1) hit path: {len(jobs)} prompts x {args.samples} cached candidates x {args.hit_tokens} tokens, K={k} "
          f"({tokens:,} tokens, {payload / MB:.1f} MB decoded payload, {wire_bytes / MB:.1f} MB on the wire); "
          f"cache filled in {fill_s:.1f} s; median of {args.repeats} (min-max ms)")
    print(f"{'path':50s} {'median ms':>10s} {'min-max ms':>12s} {'payload MB/s':>13s} {'x direct time':>14s}")
    print(f"{'direct: cache.get(generate=False), 1 process':50s} {md * 1e3:10.1f} {spread(t_direct):>12s} "
          f"{payload / MB / md:13.0f} {1.0:14.2f}")
    print(f"{'server: GetCandidates over loopback gRPC':50s} {ms * 1e3:10.1f} {spread(t_server):>12s} "
          f"{payload / MB / ms:13.0f} {ms / md:14.2f}")
    for name, t in pieces.items():
        print(f"{'  step: ' + name:50s} {t * 1e3:10.1f} {'':>12s} {payload / MB / t:13.0f} {t / md:14.2f}")
    rest = ms - md - sum(pieces.values())
    print(f"{'  rest: transport, threads, GIL (server - the above)':50s} {rest * 1e3:10.1f} {'':>12s} {'':>13s} "
          f"{rest / md:14.2f}")
    ratio = md / ms
    print(f"ratio server/direct throughput: {ratio:.2f} of medians, {min(t_direct) / min(t_server):.2f} of best times "
          f"(goal >= 0.5: {'met' if ratio >= 0.5 else 'NOT met'})")
    emit(Row("server", f"hit path payload MB/s ({len(jobs)}x{args.samples}x{args.hit_tokens}, K={k}, loopback)",
             "GetCandidates vs cache.get in process", ratio, ">= 0.5",
             f"{payload / MB / ms:,.0f} vs {payload / MB / md:,.0f} MB/s",
             {"server_ms": ms * 1e3, "direct_ms": md * 1e3, "payload_mb": payload / MB, "wire_mb": wire_bytes / MB,
              "best_times_ratio": min(t_direct) / min(t_server), "repeats": args.repeats}))
    return {"hit_ratio": ratio}


# ---------------------------------------------------------------------------------------------------- tiny model


def build_tiny_model(path: Path, hidden: int, layers: int, max_positions: int, seed: int = 0) -> None:
    """A random fp32 Qwen2 (vocab 151,936, tied embeddings) saved with the bundled Qwen2.5 tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from brts.shared.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer("qwen2.5-instruct")
    heads = max(1, hidden // 16)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions,
        tie_word_embeddings=True, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    Qwen2ForCausalLM(config).float().eval().save_pretrained(path)
    tokenizer.save_pretrained(path)


@dataclass
class TinyServer:
    runtime: Any
    running: Any
    folder: Path


def start_tiny_server(folder: Path, args: argparse.Namespace) -> TinyServer:
    from brts.server.app import RunningServer
    from brts.server.runtime import build_runtime
    from brts.shared.config import ServerConfig, load_config

    model = folder / "model"
    build_tiny_model(model, args.hidden, args.layers, args.max_positions)
    config = load_config(
        ServerConfig, None,
        [f"sampling.max_new_tokens={args.new_tokens}", f"sampling.temperature={args.temperature}",
         f"sampling.top_p={args.top_p}", f"max_logprob_k={args.k}"],
        model=str(model), cache_dir=str(folder / "serve-cache"), device=args.device, dtype="float32", port=0)
    runtime = build_runtime(config)
    try:
        running = RunningServer(runtime.config, window_s=args.window_ms / 1000).start().attach(runtime)
    except BaseException:
        runtime.close()
        raise
    return TinyServer(runtime, running, folder)


# ---------------------------------------------------------------------------------------------------- (2) miss path


def bench_miss(tiny: TinyServer, args: argparse.Namespace) -> dict[str, float]:
    from brts.server.cache import CandidateCache
    from brts.shared.client import TeacherClient

    rt, k, n = tiny.runtime, args.k, args.miss_prompts * args.samples
    sampling, seed = rt.default_sampling, rt.config.sampling.seed
    direct_cache = CandidateCache(tiny.folder / "direct-cache", rt.fingerprint, rt.pipeline,
                                  store_k=rt.config.max_logprob_k)
    client = TeacherClient(tiny.running.address)
    t_server: list[float] = []
    t_direct: list[float] = []
    t_inside: list[float] = []
    spans = time_batcher(tiny.running.service.candidates)
    same = True

    def both(prompts: list[Any], jobs: list[Any], server_first: bool) -> tuple[dict[str, float], bool]:
        results: dict[str, Any] = {}
        took: dict[str, float] = {}
        for name in ("server", "direct") if server_first else ("direct", "server"):
            t0 = time.perf_counter()
            if name == "server":
                got = list(client.get_candidates(prompts, logprob_k=k))
            else:
                got = off_main(lambda: direct_cache.get(jobs, sampling, seed, k))()
            took[name] = time.perf_counter() - t0
            assert len(got) == len(jobs) and all(not p.cache_hit for p in got), f"{name}: expected all misses"
            assert sum(len(p.candidates) for p in got) == sum(j.n_tier1 for j in jobs)
            results[name] = {p.prompt_id: [c.token_ids.tobytes() for c in p.candidates] for p in got}
        return took, results["server"] == results["direct"]

    try:
        # warm-up (untimed, small): first calls through the model, the scorer, the verifier and the wire
        both(*make_prompts(1, 1, args.prompt_len, seed=3), server_first=True)
        for r in range(args.miss_repeats):
            # round r asks for pool window [r * samples, (r + 1) * samples): new entries, the same on both sides
            prompts, jobs = make_prompts(args.miss_prompts, args.samples, args.prompt_len, seed=2,
                                         offset=r * args.samples)
            before = len(spans)
            took, equal = both(prompts, jobs, server_first=r % 2 == 0)
            t_server.append(took["server"])
            t_direct.append(took["direct"])
            t_inside.append(sum(spans[before:]))
            same = same and equal
            print(f"  miss round {r}: server {took['server']:.2f} s (of which its CandidateCache.get "
                  f"{t_inside[-1]:.2f} s, {len(spans) - before} batch), direct {took['direct']:.2f} s", flush=True)
    finally:
        client.close()
        direct_cache.close()
    ms, md = med(t_server), med(t_direct)
    ratio = md / ms
    print(f"(2) miss path: tiny Qwen2 (vocab {VOCAB}, hidden {args.hidden}, {args.layers} layers, fp32, "
          f"{args.device}, hf engine), "
          f"{args.miss_prompts} prompts x {args.samples} samples x {args.new_tokens} new tokens, K={k}, "
          f"T={args.temperature} top_p={args.top_p}; median of {args.miss_repeats} all-miss rounds")
    print(f"{'path':50s} {'median s':>9s} {'min-max s':>12s} {'candidates/s':>13s} {'tokens/s':>9s}")
    for name, t, ts in (("direct: CandidateCache.get (fresh entries)", md, t_direct),
                        ("server: GetCandidates (fresh entries)", ms, t_server)):
        print(f"{name:50s} {t:9.2f} {spread(ts, ms=False):>12s} {n / t:13.1f} {n * args.new_tokens / t:9.0f}")
    overhead = [a - b for a, b in zip(t_server, t_inside)]
    print(f"{'  of which the server batcher CandidateCache.get':50s} {med(t_inside):9.2f} "
          f"{spread(t_inside, ms=False):>12s}")
    print(f"{'  of which server overhead (the rest)':50s} {med(overhead):9.3f} {spread(overhead, ms=False):>12s}")
    print(f"ratio server/direct candidates/s: {ratio:.2f} of medians, {min(t_direct) / min(t_server):.2f} of best "
          f"times (goal >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'}); "
          f"server and direct drew identical candidates: {'yes' if same else 'NO'}")
    share = med([b / a for a, b in zip(t_server, t_inside)])
    print(f"ratio with the engine time equal on both sides (server's cache.get / its whole call): {share:.3f}; the "
          f"engine's own speed varies with the load on the machine, the server's overhead does not")
    emit(Row("server", f"miss path candidates/s ({args.miss_prompts}x{args.samples}x{args.new_tokens}, tiny Qwen2, hf)",
             "GetCandidates vs CandidateCache.get", ratio, ">= 0.9", f"{n / ms:.1f} vs {n / md:.1f} cand/s",
             {"server_s": ms, "direct_s": md, "candidates": n, "equal_engine_ratio": share,
              "identical_candidates": same, "rounds": args.miss_repeats}))
    return {"miss_ratio": ratio, "miss_ratio_equal_engine": share}


# ---------------------------------------------------------------------------------------------------- (3) score


def score_work(seed: int, args: argparse.Namespace) -> tuple[list[list[int]], list[int], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    rows = args.score_len - args.score_prompt_len
    seqs = [rng.integers(0, FIRST_SPECIAL, args.score_len).tolist() for _ in range(args.score_seqs)]
    starts = [args.score_prompt_len] * args.score_seqs
    cands = [zipf_ids(rng, rows, args.k) for _ in range(args.score_seqs)]
    return seqs, starts, cands


def bench_score(tiny: TinyServer, args: argparse.Namespace) -> dict[str, float]:
    from brts.shared.client import TeacherClient

    k, clients_n = args.k, args.clients
    rows = args.score_len - args.score_prompt_len
    work = [score_work(100 + c, args) for c in range(clients_n)]
    clients = [TeacherClient(tiny.running.address) for _ in range(clients_n)]
    positions = args.score_seqs * rows

    def check(results: list[Any]) -> None:
        assert len(results) == args.score_seqs
        for r in results:
            assert r.topk_ids.shape == (rows, k) and r.candidate_logprobs.shape == (rows, k)

    def alone() -> float:
        t0 = time.perf_counter()
        check(clients[0].score(*work[0], logprob_k=k))
        return time.perf_counter() - t0

    def loaded() -> tuple[float, list[float]]:
        barrier = threading.Barrier(clients_n + 1)
        each = [0.0] * clients_n
        errors: list[BaseException] = []

        def one(c: int) -> None:
            try:
                barrier.wait()
                t0 = time.perf_counter()
                check(clients[c].score(*work[c], logprob_k=k))
                each[c] = time.perf_counter() - t0
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(c,)) for c in range(clients_n)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if errors:
            raise errors[0]
        return wall, each

    spans = time_batcher(tiny.running.service.scores)
    in_alone: list[float] = []
    in_loaded: list[float] = []
    try:
        # warm-up: one short call (first-touch allocations, thread pools)
        clients[0].score(work[0][0][:1], work[0][1][:1], work[0][2][:1], logprob_k=k)
        t_alone: list[float] = []
        t_loaded: list[float] = []
        per_client: list[float] = []
        for r in range(args.score_repeats):
            batches = 0
            for fn in (alone, loaded) if r % 2 == 0 else (loaded, alone):
                before = len(spans)
                if fn is alone:
                    t_alone.append(alone())
                    in_alone.append(sum(spans[before:]))
                else:
                    wall, each = loaded()
                    t_loaded.append(wall)
                    per_client.extend(each)
                    in_loaded.append(sum(spans[before:]))
                    batches = len(spans) - before
            print(f"  score round {r}: alone {t_alone[-1]:.2f} s (scorer {in_alone[-1]:.2f} s), {clients_n} clients "
                  f"{t_loaded[-1]:.2f} s (scorer {in_loaded[-1]:.2f} s in {batches} batch"
                  f"{'es' if batches != 1 else ''})", flush=True)
    finally:
        for c in clients:
            c.close()
    ta, tl = med(t_alone), med(t_loaded)
    rate_alone, rate_loaded = positions / ta, clients_n * positions / tl
    ratio = rate_loaded / rate_alone
    print(f"(3) Score under load: each client scores {args.score_seqs} sequences x {args.score_len} tokens "
          f"(response from {args.score_prompt_len}: {positions:,} positions) with K={k} top-K and {k} candidate ids "
          f"per position; tiny Qwen2 server as in (2), batch window {args.window_ms:g} ms; median of "
          f"{args.score_repeats}")
    print(f"{'clients':50s} {'wall s':>9s} {'min-max s':>12s} {'positions/s':>12s} {'per-client s':>13s} "
          f"{'in scorer s':>12s}")
    print(f"{'1 alone':50s} {ta:9.2f} {spread(t_alone, ms=False):>12s} {rate_alone:12.0f} {ta:13.2f} "
          f"{med(in_alone):12.2f}")
    print(f"{f'{clients_n} concurrent (threads, own TeacherClient)':50s} {tl:9.2f} {spread(t_loaded, ms=False):>12s} "
          f"{rate_loaded:12.0f} {med(per_client):13.2f} {med(in_loaded):12.2f}")
    print(f"scaling ratio (aggregate positions/s with {clients_n} / alone): {ratio:.2f} of medians, "
          f"{clients_n * min(t_alone) / min(t_loaded):.2f} of best times; "
          f"per-client latency under load: {med(per_client) / ta:.2f}x alone")
    print(f"time outside the scorer (validation, wire, batching window): alone {med(t_alone) - med(in_alone):.2f} s, "
          f"{clients_n} clients {med(t_loaded) - med(in_loaded):.2f} s")
    emit(Row("server", f"Score positions/s, {clients_n} clients x {args.score_seqs} seqs x {args.score_len} tokens "
             f"({rows} positions each)", f"{clients_n} concurrent vs 1 alone", ratio, None,
             f"{rate_loaded:,.0f} vs {rate_alone:,.0f} pos/s",
             {"aggregate_pos_s": rate_loaded, "alone_pos_s": rate_alone, "loaded_s": tl, "alone_s": ta,
              "rounds": args.score_repeats}))
    return {"score_ratio": ratio}


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--part", choices=("hit", "miss", "score", "all"), default="all")
    ap.add_argument("--k", type=int, default=16, help="top-K everywhere (default 16)")
    ap.add_argument("--samples", type=int, default=4, help="candidates per prompt, (1) and (2) (default 4)")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens, (1) and (2) (default 64)")
    ap.add_argument("--window-ms", type=float, default=10.0, help="server batch window (default 10, the config's)")
    g = ap.add_argument_group("(1) hit path")
    g.add_argument("--hit-prompts", type=int, default=64, help="default 64")
    g.add_argument("--hit-tokens", type=int, default=4096, help="tokens per cached candidate (default 4096)")
    g.add_argument("--repeats", type=int, default=5, help="timed repeats per side after one warm-up (default 5)")
    g = ap.add_argument_group("tiny model, (2) and (3)")
    g.add_argument("--hidden", type=int, default=64, help="default 64")
    g.add_argument("--layers", type=int, default=2, help="default 2")
    g.add_argument("--max-positions", type=int, default=4096, help="max_position_embeddings (default 4096)")
    g.add_argument("--device", default="cpu", help="torch device of the tiny model: cpu (default) or cuda")
    g = ap.add_argument_group("(2) miss path")
    g.add_argument("--miss-prompts", type=int, default=4, help="default 4 (issue #5: 16)")
    g.add_argument("--new-tokens", type=int, default=32, help="default 32 (issue #5: 64)")
    g.add_argument("--temperature", type=float, default=1.0, help="default 1.0")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="default 1.0 (a random model's nucleus at 0.95 is most of the vocabulary: a full sort "
                        "per row and step, the same on both sides but slow)")
    g.add_argument("--miss-repeats", type=int, default=3,
                   help="timed all-miss rounds per side, after a small warm-up (default 3)")
    g = ap.add_argument_group("(3) Score under load")
    g.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    g.add_argument("--score-seqs", type=int, default=8, help="sequences per client call (default 8)")
    g.add_argument("--score-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    g.add_argument("--score-prompt-len", type=int, default=1920,
                   help="response_start: positions scored per sequence are score-len minus this (default 1920, "
                        "i.e. 128 positions: the full-vocabulary LM head costs ~4 ms per position on 2 CPU cores)")
    g.add_argument("--score-repeats", type=int, default=2, help="timed rounds, alone and loaded (default 2)")
    ap.add_argument("--malloc-arena-max", type=int, default=1,
                    help="re-run this script with MALLOC_ARENA_MAX set to this (default 1; 0 = leave the environment "
                         "alone): with glibc's per-thread arenas, the same hf work ran up to 2x slower on one worker "
                         "thread than on another (vocab-sized temporaries), which is not the server's overhead")
    args = ap.parse_args(argv)
    if args.malloc_arena_max > 0 and os.environ.get("MALLOC_ARENA_MAX") != str(args.malloc_arena_max):
        env = dict(os.environ, MALLOC_ARENA_MAX=str(args.malloc_arena_max))
        sys.stdout.flush()
        rest = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *rest], env)
    if not 0 < args.score_prompt_len < args.score_len <= args.max_positions:
        ap.error("need 0 < --score-prompt-len < --score-len <= --max-positions")
    if args.prompt_len + args.new_tokens > args.max_positions:
        ap.error("need --prompt-len + --new-tokens <= --max-positions")

    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    arenas = os.environ.get("MALLOC_ARENA_MAX", "unset")
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs (load average {load:.1f} at the start); "
          f"python {sys.version.split()[0]}; MALLOC_ARENA_MAX={arenas}", flush=True)
    out: dict[str, float] = {}
    if args.part in ("hit", "all"):
        out.update(bench_hit(args))
    if args.part in ("miss", "score", "all"):
        with tempfile.TemporaryDirectory(prefix="bench-server-tiny-") as tmp:
            t0 = time.perf_counter()
            tiny = start_tiny_server(Path(tmp), args)
            print(f"\ntiny-model server up in {time.perf_counter() - t0:.1f} s at {tiny.running.address}", flush=True)
            try:
                if args.part in ("miss", "all"):
                    out.update(bench_miss(tiny, args))
                if args.part in ("score", "all"):
                    if args.part == "all":
                        print()
                    out.update(bench_score(tiny, args))
            finally:
                tiny.running.stop(grace_s=5)
    print("\nsummary: " + ", ".join(f"{name} {value:.2f}" for name, value in out.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
