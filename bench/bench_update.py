"""Tokens/s of the training update (FSDP2, gloo, CPU) at 1 and 2 ranks, side by side in one run.

    python bench/bench_update.py                 # both parts below
    python bench/bench_update.py --part scaling --ranks 1 2 4 --steps 8
    python bench/bench_update.py --part checkpointing --ac-length 8192

Why: the update must be the same computation at any number of ranks (issue #7); this measures what the second
rank buys on the tiny CPU config. Each world size runs as its own ``torch.distributed.run`` launch with the same
GLOBAL batch (student-context and teacher-context sequences of uneven lengths, split across ranks), one torch
thread per rank; the figure is the median over timed steps (after one warm-up) of global masked-in tokens per
second of wall time. On 2 cores a perfect scaling ratio (2 ranks / 1 rank) is 2.0.

Activation checkpointing (issue #23, goal <= 0.7): the peak memory of one update with
``activation_checkpointing`` on vs off, same model, same batch, each in its own process (one rank, gloo) so that
each peak is its own. The shape is one where activations dominate, as they do at paper scale (32,768-token
micro-batches): 8 layers of hidden 256, a 1,024-token vocabulary (with the real 151,936 rows and a tiny hidden
size, the chunked loss's logits and the embedding's optimizer state dominate and the ratio reads about 1.0) and
one 4,096-token sequence per branch. A small warm-up update first allocates the optimizer state and the gradients;
the figure is the peak RSS (ru_maxrss) during the measured update minus the RSS right before it, i.e. what the
update itself adds: activations, the backward's temporaries, the optimizer's step. The total peak RSS (torch and
the interpreter included) is printed beside it.
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


def memory_worker(args: argparse.Namespace) -> None:
    """One rank: a warm-up update on a short batch, then the measured one; prints the JSON figures."""
    import resource

    import torch
    import torch.distributed
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from brts.trainer.fsdp import init_distributed, shard_student
    from brts.trainer.update import TrainSequence, UpdateConfig, Updater, make_optimizer

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=args.ac_vocab, hidden_size=args.ac_hidden, intermediate_size=2 * args.ac_hidden,
        num_hidden_layers=args.ac_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.ac_length, tie_word_embeddings=True)).eval()  # as from_pretrained leaves it
    wrapper = shard_student(model, info, bf16=False, activation_checkpointing=args.ac == 1, chunk_size=256)
    updater = Updater(wrapper, make_optimizer(wrapper, 1e-6, (0.9, 0.999), 0.01),
                      UpdateConfig(token_budget=args.ac_length), info.device)
    g = torch.Generator().manual_seed(1)

    def seq(length: int) -> TrainSequence:
        rows = length - 32
        ids = torch.randint(0, args.ac_vocab, (rows, args.k), generator=g)
        lp = torch.log_softmax(torch.randn(rows, args.k, generator=g), -1).sort(-1, descending=True).values
        return TrainSequence(torch.randint(0, args.ac_vocab, (length,), generator=g), 32, ids, lp)

    updater.step([seq(64)], [seq(64)])  # optimizer state and gradients exist from here on
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0 = time.perf_counter()
    stats = updater.step([seq(args.ac_length)], [seq(args.ac_length)])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "before": before, "seconds": seconds, "loss": stats.loss,
                      "checkpointing": bool(model.model.gradient_checkpointing and model.training)}))
    torch.distributed.destroy_process_group()


def checkpointing_part(args: argparse.Namespace) -> None:
    """Both memory workers (off first, then on), the table and the row."""
    runs = {}
    for ac in (0, 1):
        cmd = [sys.executable, __file__, "--memory-worker", "--ac", str(ac), "--ac-length", str(args.ac_length),
               "--ac-hidden", str(args.ac_hidden), "--ac-layers", str(args.ac_layers), "--ac-vocab",
               str(args.ac_vocab), "--k", str(args.k)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MASTER_PORT=str(29400 + ac)))
        if r.returncode:
            sys.exit(f"checkpointing={ac} failed:\n{r.stderr[-3000:]}")
        runs[ac] = json.loads(r.stdout.strip().splitlines()[-1])
    off, on = runs[0], runs[1]
    assert on["checkpointing"] and not off["checkpointing"], runs
    gib = 1024**3
    print(f"\none update, activation checkpointing on vs off (1 rank, CPU): 1+1 sequences of {args.ac_length} tokens, "
          f"hidden {args.ac_hidden}, {args.ac_layers} layers, vocab {args.ac_vocab}, K {args.k}")
    print(f"{'checkpointing':>13} {'peak RSS GiB':>13} {'update adds GiB':>16} {'s':>7} {'loss':>10}")
    for name, r in (("off", off), ("on", on)):
        print(f"{name:>13} {r['peak'] / gib:>13.3f} {(r['peak'] - r['before']) / gib:>16.3f} {r['seconds']:>7.2f} "
              f"{r['loss']:>10.5f}")
    ratio = (on["peak"] - on["before"]) / (off["peak"] - off["before"])
    print(f"ratio on/off of what the update adds: {ratio:.2f} (goal <= 0.7); of the total peak RSS: "
          f"{on['peak'] / off['peak']:.2f}; same loss: {abs(on['loss'] - off['loss']) < 1e-5}")
    emit(Row("update", f"peak memory of one update, checkpointing on vs off ({args.ac_layers}x{args.ac_hidden}, "
             f"{args.ac_length}-token sequences, CPU)", "on vs off", ratio, "<= 0.7",
             f"{(on['peak'] - on['before']) / gib:.2f} vs {(off['peak'] - off['before']) / gib:.2f} GiB",
             {"on_above_gib": (on["peak"] - on["before"]) / gib, "off_above_gib": (off["peak"] - off["before"]) / gib,
              "on_peak_gib": on["peak"] / gib, "off_peak_gib": off["peak"] / gib, "on_s": on["seconds"],
              "off_s": off["seconds"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("scaling", "checkpointing", "all"), default="all")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=5, help="timed steps per world size (after one warm-up)")
    p.add_argument("--sequences", type=int, default=8, help="sequences per branch per step (global)")
    p.add_argument("--length", type=int, default=512, help="longest sequence (lengths are uniform in [L/2, L))")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--token-budget", type=int, default=2048)
    p.add_argument("--ac-length", type=int, default=4096, help="checkpointing part: tokens per sequence")
    p.add_argument("--ac-hidden", type=int, default=256, help="checkpointing part: hidden size")
    p.add_argument("--ac-layers", type=int, default=8, help="checkpointing part: layers")
    p.add_argument("--ac-vocab", type=int, default=1024, help="checkpointing part: vocabulary")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ac", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.memory_worker:
        memory_worker(args)
        return
    if args.part in ("scaling", "all"):
        scaling_part(args)
    if args.part in ("checkpointing", "all"):
        checkpointing_part(args)


def scaling_part(args: argparse.Namespace) -> None:
    """Each world size as its own torchrun launch; the table and the rows."""
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
