"""Tokens/s of the training update (FSDP2, gloo, CPU) at 1 and 2 ranks, side by side in one run.

    python bench/bench_update.py                 # tiny CPU student, 1 and 2 ranks, 5 timed steps each
    python bench/bench_update.py --ranks 1 2 4 --steps 8

Why: the update must be the same computation at any number of ranks (issue #7); this measures what the second
rank buys on the tiny CPU config. Each world size runs as its own ``torch.distributed.run`` launch with the same
GLOBAL batch (student-context and teacher-context sequences of uneven lengths, split across ranks), one torch
thread per rank; the figure is the median over timed steps (after one warm-up) of global masked-in tokens per
second of wall time. On 2 cores a perfect scaling ratio (2 ranks / 1 rank) is 2.0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _rows import Row, emit
except ImportError:  # pragma: no cover
    from bench._rows import Row, emit


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from brts.trainer.fsdp import init_distributed, shard_student
    from brts.trainer.update import TrainSequence, UpdateConfig, Updater, make_optimizer

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True))
    wrapper = shard_student(model, info, bf16=False, chunk_size=256)
    updater = Updater(wrapper, make_optimizer(wrapper, 1e-6, (0.9, 0.999), 0.01),
                      UpdateConfig(token_budget=args.token_budget), info.device)
    g = torch.Generator().manual_seed(1)

    def seqs(n: int) -> list:
        out = []
        for _ in range(n):
            length = int(torch.randint(args.length // 2, args.length, (1,), generator=g))
            start = 32
            rows = length - start
            ids = torch.randint(0, args.vocab, (rows, args.k), generator=g)
            lp = torch.log_softmax(torch.randn(rows, args.k, generator=g), -1).sort(-1, descending=True).values
            out.append(TrainSequence(torch.randint(0, args.vocab, (length,), generator=g), start, ids, lp))
        return out

    batches = [(seqs(args.sequences), seqs(args.sequences)) for _ in range(args.steps + 1)]
    times, tokens = [], []
    for n, (sc, tc) in enumerate(batches):
        dist.barrier()
        t0 = time.perf_counter()
        stats = updater.step(sc[info.rank :: info.world_size], tc[info.rank :: info.world_size])
        dist.barrier()
        if n:  # the first step warms up
            times.append(time.perf_counter() - t0)
            tokens.append(stats.sc_tokens + stats.tc_tokens)
    if info.is_main:
        Path(args.out).write_text(json.dumps({"times": times, "tokens": tokens}))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=5, help="timed steps per world size (after one warm-up)")
    p.add_argument("--sequences", type=int, default=8, help="sequences per branch per step (global)")
    p.add_argument("--length", type=int, default=512, help="longest sequence (lengths are uniform in [L/2, L))")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--token-budget", type=int, default=2048)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.ranks:
            out = Path(tmp) / f"w{world}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
                   "--worker", "--out", str(out)] + [a for a in sys.argv[1:]]
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if r.returncode:
                sys.exit(f"world {world} failed:\n{r.stderr[-3000:]}")
            data = json.loads(out.read_text())
            rates = [t / s for t, s in zip(data["tokens"], data["times"])]
            rows.append((world, statistics.median(data["times"]), statistics.median(rates)))
    base = rows[0][2]
    print(f"update on CPU (gloo, 1 thread/rank): {args.sequences}+{args.sequences} sequences of {args.length // 2}.."
          f"{args.length} tokens per step, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, K {args.k}")
    print(f"{'ranks':>5} {'s/step':>8} {'tokens/s':>10} {'vs 1 rank':>10}")
    for world, secs, rate in rows:
        print(f"{world:>5} {secs:>8.3f} {rate:>10.0f} {rate / base:>10.2f}")
    for world, secs, rate in rows[1:]:
        perfect = world / rows[0][0]
        emit(Row("update", f"FSDP2 update tokens/s, CPU gloo ({os.cpu_count()} cores; perfect = {perfect:g})",
                 f"{world} ranks vs {rows[0][0]}", rate / base, None, f"{rate:,.0f} vs {base:,.0f} tok/s",
                 {f"tok_s_{world}": rate, f"tok_s_{rows[0][0]}": base, f"s_per_step_{world}": secs,
                  f"s_per_step_{rows[0][0]}": rows[0][1], "timed_steps": args.steps}))


if __name__ == "__main__":
    main()
