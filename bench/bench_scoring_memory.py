"""Peak memory of scoring one long sequence: TorchScorer (chunked) vs a naive full-logits fp32 computation.

    python bench/bench_scoring_memory.py                          # 8,192 tokens, V = 151,936 (the issue's case)
    python bench/bench_scoring_memory.py --tokens 2048 --chunk 256 # a quick look

Why: the exact scorer exists so that the teacher's per-position top-K and candidate log-probs never need the
T×V fp32 logits (8,192 × 151,936 × 4 B = 5 GB, and as much again for their log-softmax). This measures it.

The model is a tiny random Qwen2 with the real Qwen2.5 vocabulary (151,936), so that the vocabulary-sized
tensors dominate as they do for real teachers. Each case runs in its own subprocess so that its peak is its
own: ``baseline`` builds the model and the inputs and stops; ``scorer`` then scores with
``brts.shared.engines.scorer.TorchScorer`` (top-K and candidate ids at every response position); ``naive`` runs
``model(input_ids).logits`` → fp32 ``log_softmax`` → top-K and gather. On CPU a case's peak is the child's
peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) minus the baseline child's; on CUDA it is
``torch.cuda.max_memory_allocated`` above what was allocated before scoring. The two cases' top-K log-probs
are compared as well, so a "saving" from computing something else would show.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _rows import Row, emit
except ImportError:  # pragma: no cover
    from bench._rows import Row, emit

MIB = 1024**2


def _build(args: argparse.Namespace):  # noqa: ANN202 - torch types imported lazily
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.tokens, tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config).eval().to(args.device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    cand = torch.randint(0, args.vocab, (args.tokens - 1, args.k), generator=g)
    return model, ids, cand


def _child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, ids, cand = _build(args)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    top = None
    if args.mode == "scorer":
        from brts.shared.engines.base import ScoreItem
        from brts.shared.engines.scorer import TorchScorer

        scorer = TorchScorer(model, chunk_size=args.chunk)
        (out,) = scorer.score([ScoreItem(tuple(ids.tolist()), 1, cand.numpy())], k=args.k)
        top = out.topk.logprobs
    elif args.mode == "naive":
        with torch.inference_mode():
            logits = model(ids[None].to(args.device)).logits[0, :-1].float()  # [T-1, V] fp32
            logp = torch.log_softmax(logits, dim=-1)
            top = torch.topk(logp, args.k, dim=-1).values.cpu().numpy()
            _ = torch.gather(logp, 1, cand.to(args.device)).cpu()
    seconds = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    if top is not None and args.save:
        np.save(args.save, top)
    print(json.dumps({"mode": args.mode, "peak_bytes": int(peak), "seconds": seconds}))


def _run(mode: str, args: argparse.Namespace, save: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--tokens", str(args.tokens), "--vocab",
           str(args.vocab), "--hidden", str(args.hidden), "--chunk", str(args.chunk), "--k", str(args.k),
           "--device", args.device, "--threads", str(args.threads)]
    if save:
        cmd += ["--save", save]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the children (0 = torch's default)")
    p.add_argument("--child", choices=("baseline", "scorer", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.mode = args.child
        _child(args)
        return

    import numpy as np

    cuda = args.device.startswith("cuda")
    print(f"scoring one sequence of {args.tokens} tokens (all {args.tokens - 1} positions), vocabulary {args.vocab}, "
          f"tiny random Qwen2 (hidden {args.hidden}, 2 layers), fp32, top-K {args.k} + {args.k} candidate ids per "
          f"position, device {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        base = _run("baseline", args, None)
        scorer = _run("scorer", args, os.path.join(tmp, "scorer.npy"))
        naive = _run("naive", args, os.path.join(tmp, "naive.npy"))
        diff = float(np.abs(np.load(os.path.join(tmp, "scorer.npy")) - np.load(os.path.join(tmp, "naive.npy"))).max())
    sub = 0 if cuda else base["peak_bytes"]
    s_peak, n_peak = scorer["peak_bytes"] - sub, naive["peak_bytes"] - sub
    what = "allocated above the model (CUDA)" if cuda else "peak RSS above the baseline"
    if not cuda:
        print(f"baseline (interpreter, torch, model, inputs): peak RSS {base['peak_bytes'] / MIB:,.0f} MiB")
    print(f"TorchScorer (chunk {args.chunk}):  {what} {s_peak / MIB:,.0f} MiB   {scorer['seconds']:.2f} s")
    print(f"naive full logits fp32:       {what} {n_peak / MIB:,.0f} MiB   {naive['seconds']:.2f} s")
    print(f"T×V fp32 logits alone would be {(args.tokens - 1) * args.vocab * 4 / MIB:,.0f} MiB")
    print(f"max |top-K log-prob difference| scorer vs naive: {diff:.2e}")
    ratio = s_peak / n_peak if n_peak > 0 else float("nan")
    print(f"ratio scorer/naive = {ratio:.3f}  (goal <= 0.25: {'met' if ratio <= 0.25 else 'NOT met'})")
    emit(Row("scoring_memory", f"peak {'alloc' if cuda else 'RSS'} above baseline, scoring {args.tokens:,} tokens "
             f"(V={args.vocab:,})", "TorchScorer vs naive full logits", ratio, "<= 0.25",
             f"{s_peak / MIB:,.0f} vs {n_peak / MIB:,.0f} MiB",
             {"scorer_mib": s_peak / MIB, "naive_mib": n_peak / MIB, "scorer_s": scorer["seconds"],
              "naive_s": naive["seconds"], "max_topk_abs_diff": diff}))


if __name__ == "__main__":
    main()
