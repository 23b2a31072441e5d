"""bench_server part (1), the hit path: GetCandidates over loopback against the same cached read in process.

See bench/bench_server.py's docstring for what is measured and why; this module holds the part's test doubles
(an engine of fixed-length Zipf-like samples, a scorer of teacher-like top-K) and its timing.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _rows import Row, emit
    from _server_common import (
        CDF_TEXT,
        MB,
        VOCAB,
        make_prompts,
        med,
        off_main,
        spread,
        teacher_logprobs,
        timed_pair,
        zipf_ids,
    )
except ImportError:  # pragma: no cover
    from bench._rows import Row, emit
    from bench._server_common import (
        CDF_TEXT,
        MB,
        VOCAB,
        make_prompts,
        med,
        off_main,
        spread,
        teacher_logprobs,
        timed_pair,
        zipf_ids,
    )


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
                body = np.searchsorted(CDF_TEXT, rng.random(self.tokens - 1))
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
    from brts.server.pipeline import CandidatePipeline
    from brts.server.runtime import TeacherRuntime
    from brts.shared.config import ServerConfig, load_config
    from brts.shared.engines.base import SamplingParams
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
