"""bench_server parts (2) and (3), on the tiny-model server: the miss path (candidates/s through the server
against the same engine called directly) and Score under load (4 clients against one alone; 2 CPU scorer replicas
against one scorer at 2 and 4 clients).

See bench/bench_server.py's docstring for what is measured and why.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _rows import Row, emit
    from _server_common import (
        FIRST_SPECIAL,
        VOCAB,
        TinyServer,
        make_prompts,
        med,
        off_main,
        spread,
        time_batcher,
        zipf_ids,
    )
except ImportError:  # pragma: no cover
    from bench._rows import Row, emit
    from bench._server_common import (
        FIRST_SPECIAL,
        VOCAB,
        TinyServer,
        make_prompts,
        med,
        off_main,
        spread,
        time_batcher,
        zipf_ids,
    )


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
        def one(c: int) -> float:
            t0 = time.perf_counter()
            check(clients[c].score(*work[c], logprob_k=k))
            return time.perf_counter() - t0

        return released_together(clients_n, one)

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


# ---------------------------------------------------------------------------------------------------- (3) replicas


class ServeProcess:
    """`brts serve` on the tiny model in a subprocess of its own: torch's CPU thread count is process-wide
    (server/scorer_pool.py), so a 2-replica server in this process would set it for the 1-scorer server too."""

    def __init__(self, model: Path, cache: Path, args: argparse.Namespace, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "brts.cli", "serve", "--model", str(model), "--cache", str(cache), "--port", "0",
               "--device", "cpu", "--dtype", "float32", "--max-logprob-k", str(args.k),
               f"batch_window_ms={args.replica_window_ms}", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert self.proc.stdout is not None
        self.lines: list[str] = []
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            found = re.search(r"listening on (\S+)", line)
            if found:
                self.address = found.group(1)
                break
        else:
            raise RuntimeError("brts serve exited:\n" + "\n".join(self.lines[-20:]))
        self._drain = threading.Thread(target=lambda: self.lines.extend(x.rstrip() for x in self.proc.stdout),
                                       daemon=True)
        self._drain.start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=300)


def released_together(n: int, call: Callable[[int], Any]) -> tuple[float, list[Any]]:
    """Run ``call(0..n-1)`` on n threads released together by a barrier: the wall time from the release to the
    last return, and each call's result; the first exception is re-raised."""
    barrier = threading.Barrier(n + 1)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def one(c: int) -> None:
        try:
            barrier.wait()
            results[c] = call(c)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall, results


def _concurrent_scores(clients: list[Any], work: list[Any], k: int, seqs: int) -> tuple[float, list[Any]]:
    """Every client scores its own work at once (released together by a barrier): the wall time and the replies."""
    def one(c: int) -> Any:
        replies = clients[c].score(*work[c], logprob_k=k)
        assert len(replies) == seqs
        return replies

    return released_together(len(clients), one)


def _largest_gap(a: list[Any], b: list[Any]) -> float:
    """The largest |difference| between two servers' replies to the same calls (top-K and candidate log-probs)."""
    gaps = [float(np.max(np.abs(x.topk_logprobs - y.topk_logprobs))) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    gaps += [float(np.max(np.abs(x.candidate_logprobs - y.candidate_logprobs)))
             for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return max(gaps)


def bench_score_replicas(model: Path, folder: Path, args: argparse.Namespace) -> dict[str, float]:
    """Score positions/s of a server with 2 CPU scorer replicas against one with a single scorer (today's), at each
    client count, the rounds of the two servers interleaved; both servers answer the same calls."""
    from brts.shared.client import TeacherClient

    counts = [int(c) for c in args.replica_clients.split(",")]
    k, most, positions = args.k, max(counts), args.score_seqs * (args.score_len - args.score_prompt_len)
    work = [score_work(200 + c, args) for c in range(most)]
    setups = {"1 scorer": [], "2 CPU replicas": ["--scorer-devices", "cpu,cpu"]}
    servers: dict[str, ServeProcess] = {}
    clients: dict[str, list[Any]] = {}
    times: dict[tuple[str, int], list[float]] = {(name, n): [] for name in setups for n in counts}
    gap = 0.0
    try:
        for i, (name, extra) in enumerate(setups.items()):
            servers[name] = ServeProcess(model, folder / f"replica-cache-{i}", args, extra)
            clients[name] = [TeacherClient(servers[name].address) for _ in range(most)]
            clients[name][0].score(work[0][0][:1], work[0][1][:1], work[0][2][:1], logprob_k=k)  # warm-up
        for r in range(args.replica_repeats):
            order = list(setups) if r % 2 == 0 else list(reversed(setups))
            for n in counts:
                replies = {}
                for name in order:
                    wall, replies[name] = _concurrent_scores(clients[name][:n], work[:n], k, args.score_seqs)
                    times[name, n].append(wall)
                gap = max(gap, _largest_gap(*replies.values()))
            print("  replicas round " + str(r) + ": " + ", ".join(
                f"{name} x{n} clients {times[name, n][-1]:.2f} s" for n in counts for name in order), flush=True)
    finally:
        for name in clients:
            for c in clients[name]:
                c.close()
        for server in servers.values():
            server.stop()
    print(f"(3) Score with scorer replicas: `brts serve` subprocesses on the tiny model (fp32 CPU, hf engine, "
          f"{os.cpu_count()} CPUs), one with a single scorer (no --scorer-devices), one with --scorer-devices "
          f"cpu,cpu (torch threads split between the replicas); batch window {args.replica_window_ms:g} ms; each "
          f"client scores the work of (3) above ({positions:,} positions per call); median of "
          f"{args.replica_repeats} interleaved rounds")
    print(f"{'clients':10s} {'1 scorer pos/s':>15s} {'2 replicas pos/s':>17s} {'ratio':>6s}")
    out = {}
    for n in counts:
        one, two = (n * positions / med(times[name, n]) for name in setups)
        print(f"{n:<10d} {one:15,.0f} {two:17,.0f} {two / one:6.2f}")
        emit(Row("server", f"Score positions/s, {n} concurrent clients x {args.score_seqs} seqs x {args.score_len} "
                 f"tokens, window {args.replica_window_ms:g} ms", "2 CPU scorer replicas vs 1 scorer", two / one, None,
                 f"{two:,.0f} vs {one:,.0f} pos/s",
                 {"replicas_pos_s": two, "one_scorer_pos_s": one, "clients": n, "rounds": args.replica_repeats,
                  "window_ms": args.replica_window_ms, "largest_gap_nats": gap}))
        out[f"replicas_ratio_{n}_clients"] = two / one
    print(f"the two servers' replies to the same calls differ by at most {gap:.1e} nats")
    return out
