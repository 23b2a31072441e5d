"""Peak memory and time of the dual-branch loss path: chunked top-K log-probs vs naive full logits.

    python bench/bench_loss_memory.py                       # 1 x 4096 tokens, V = 151,936, H = 128
    python bench/bench_loss_memory.py --tokens 1024 --hidden 64 --big-batch 0   # a quick look

What one case runs (forward + backward, once per repeat), for B x T tokens:
  student-context branch: the student's top-K (K=16) log-probs on its rollout, hidden_sc [B, T, H];
  teacher-context branch: the student's log-probs at the teacher's top-K ids on the chosen
  candidate, hidden_tc [B, T, H]; then L = L_SC + λ·L_TC (`brts.trainer.losses.dual_branch_loss`)
  and its backward into both hidden states and the shared lm_head W [V, H].
  `naive` materialises fp32 [B·T, V] logits and log_softmax for each branch (what the reference
  does, brts-reference §10); `chunked` uses `brts.trainer.topk_logprobs.chunked_topk_logprobs`.

Each case runs in its own subprocess, so that its peak is its own: on CPU the peak resident set
size (ru_maxrss) of that process, also reported above the baseline measured right before the first
forward (interpreter, torch, the inputs and W); on CUDA torch.cuda.max_memory_allocated. The naive
case at 4 x 4096 is not run: its logits alone are ~10 GB fp32, ~20+ GB with log_softmax and grads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _rows import Row, emit
except ImportError:  # pragma: no cover
    from bench._rows import Row, emit

GIB = 1024**3


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; no psutil needed)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(args: argparse.Namespace) -> None:
    import torch

    from brts.trainer.losses import dual_branch_loss
    from brts.trainer.topk_logprobs import chunked_topk_logprobs

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    b, t, h, v, k = args.batch, args.tokens, args.hidden, args.vocab, args.k
    hidden_sc = torch.randn(b, t, h, generator=g).to(dev).requires_grad_(True)
    hidden_tc = torch.randn(b, t, h, generator=g).to(dev).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dev).requires_grad_(True)
    teacher_sc = torch.log_softmax(torch.randn(b, t, 64, generator=g), -1)[..., :k].to(dev)
    teacher_ids = torch.randint(0, v, (b, t, k), generator=g).to(dev)
    teacher_logp = torch.log_softmax(torch.randn(b, t, 64, generator=g), -1)[..., :k]
    teacher_tc = torch.sort(teacher_logp, descending=True).values.to(dev)
    mask = torch.ones(b, t, dtype=torch.bool, device=dev)

    def step() -> float:
        if args.mode == "chunked":
            a = chunked_topk_logprobs(hidden_sc, weight, k, chunk_size=args.chunk).topk_logprobs
            ell = chunked_topk_logprobs(hidden_tc, weight, 0, teacher_ids, chunk_size=args.chunk).gathered_logprobs
        else:
            lp_sc = torch.log_softmax((hidden_sc @ weight.t()).float(), dim=-1)
            a = lp_sc.topk(k, dim=-1).values
            lp_tc = torch.log_softmax((hidden_tc @ weight.t()).float(), dim=-1)
            ell = lp_tc.gather(-1, teacher_ids)
        loss = dual_branch_loss(a, teacher_sc, mask, ell, teacher_tc, mask, lam=1.0).total
        loss.backward()
        return float(loss.detach())

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _rss_bytes()
    times: list[float] = []
    loss = 0.0
    for _ in range(args.repeats):
        for p in (hidden_sc, hidden_tc, weight):
            p.grad = None
        t0 = time.perf_counter()
        loss = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak": peak, "baseline": baseline, "time": min(times), "loss": loss}))


def _run_case(args: argparse.Namespace, mode: str, batch: int) -> dict[str, float]:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode, "--batch", str(batch),
        "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
        "--k", str(args.k), "--chunk", str(args.chunk), "--repeats", str(args.repeats),
        "--device", args.device, "--threads", str(args.threads),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} {batch}x{args.tokens} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per sequence T")
    p.add_argument("--vocab", type=int, default=151_936, help="vocabulary size V")
    p.add_argument("--hidden", type=int, default=128,
                   help="hidden size H: sets W's size (V*H*4 bytes) and the matmul time, not the logits")
    p.add_argument("--k", type=int, default=16, help="top-K")
    p.add_argument("--chunk", type=int, default=1024, help="positions per chunk")
    p.add_argument("--big-batch", type=int, default=4, help="also run chunked at this B x T (0: skip)")
    p.add_argument("--repeats", type=int, default=1, help="fwd+bwd repeats per case; the time is the minimum")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return

    unit = "peak RSS" if args.device == "cpu" else "peak alloc"
    print(
        f"dual-branch loss fwd+bwd, V={args.vocab:,}, H={args.hidden}, K={args.k}, chunk={args.chunk}, "
        f"device={args.device}, threads={args.threads or 'default'}, repeats={args.repeats}"
    )
    cases = [("naive", 1), ("chunked", 1)] + ([("chunked", args.big_batch)] if args.big_batch else [])
    results: dict[tuple[str, int], dict[str, float]] = {}
    print(f"{'case':<22}{unit + ' GiB':>16}{'above baseline GiB':>20}{'fwd+bwd s':>12}{'loss':>12}")
    for mode, batch in cases:
        r = _run_case(args, mode, batch)
        results[(mode, batch)] = r
        label = f"{mode} {batch}x{args.tokens}"
        print(f"{label:<22}{r['peak'] / GIB:>16.3f}{(r['peak'] - r['baseline']) / GIB:>20.3f}"
              f"{r['time']:>12.2f}{r['loss']:>12.5f}")
    naive, chunked = results[("naive", 1)], results[("chunked", 1)]
    above = (chunked["peak"] - chunked["baseline"]) / (naive["peak"] - naive["baseline"])
    total = chunked["peak"] / naive["peak"]
    goal = "met" if above <= 0.25 else "NOT met"
    print(
        f"chunked/naive at 1x{args.tokens}: memory above baseline {above:.3f} (goal <= 0.25: {goal}), "
        f"{unit} {total:.3f}, time {chunked['time'] / naive['time']:.2f}"
    )
    logits_gib = args.tokens * args.vocab * 4 / GIB
    print(f"(one fp32 [T, V] logits tensor at 1x{args.tokens}: {logits_gib:.2f} GiB; "
          f"one chunk: {args.chunk * args.vocab * 4 / GIB:.3f} GiB)")
    n_above, c_above = (naive["peak"] - naive["baseline"]) / GIB, (chunked["peak"] - chunked["baseline"]) / GIB
    case = f"1x{args.tokens}, V={args.vocab:,}"
    emit(
        Row("loss_memory", f"fwd+bwd {unit} above baseline ({case})", "chunked vs naive", above, "<= 0.25",
            f"{c_above:.2f} vs {n_above:.2f} GiB",
            {"chunked_above_gib": c_above, "naive_above_gib": n_above, "chunked_peak_gib": chunked["peak"] / GIB,
             "naive_peak_gib": naive["peak"] / GIB}),
        Row("loss_memory", f"fwd+bwd time ({case})", "chunked vs naive", chunked["time"] / naive["time"], None,
            f"{chunked['time']:.2f} vs {naive['time']:.2f} s",
            {"chunked_s": chunked["time"], "naive_s": naive["time"]}),
    )


if __name__ == "__main__":
    main()
