"""GPU check of the parts of brts that only a CUDA machine exercises: generation, scoring, the loss path, FSDP2.

    python bench/gpu_check.py --out gpu_check.json                  # CUDA, bf16, full sizes (~2-4 min on an H100)
    python bench/gpu_check.py --device cpu --out /tmp/g.json        # small sizes, to check the script's logic

Why this exists: the test suite and the CPU benches run on machines without a GPU, so nothing there shows how
our code behaves under CUDA kernels, bf16 tensor-core matmuls, the caching allocator or NCCL. On one GPU this
script checks and measures, each section on its own (a failure is recorded and the next section still runs):

1. ``hf`` engine (``brts.shared.engines.hf.HFEngine``) on a random tiny Qwen2 with the real 151,936 vocabulary in
   bf16: prompts x samples x new tokens, tokens/s; the EOS convention (a "stop" sample ends with exactly one EOS
   and has none before it, a "length" sample has exactly max_new_tokens and no EOS); and whether a seed's sample
   is the same alone as inside a bigger batch (bf16 batched kernels may differ: the share identical is reported,
   with fp32 for comparison). The EOS row of the random LM head is boosted so that some samples do stop.
2. The exact scorer (``engine.scorer()``, ``TorchScorer.score``) on the same model in fp32 (TF32 off) and bf16,
   against a plain ``model(ids).logits.float().log_softmax(-1)`` top-K and gather computed here.
3. The loss path (``chunked_topk_logprobs`` + ``dual_branch_loss``) with bf16 hidden states and LM head,
   forward + backward: time and peak memory against a naive full-logits fp32 implementation of the same loss,
   and the agreement of loss values and gradients. Optionally also runs the two existing memory benches.
4. One FSDP2 (``fully_shard``, bf16 params / fp32 reduce, fp32 master weights) training step of a small Qwen2
   student, single process (NCCL on CUDA, gloo on CPU): student hidden states -> chunked top-K log-probs inside
   the root FSDP unit's forward -> dual-branch loss against a fixed random teacher -> backward, grad clipping,
   AdamW; repeated on one batch, the loss must fall.

A JSON of every figure goes to ``--out``; the report goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

# Each section lives in its own sibling module (bench/_gpu_*.py); this script keeps the options, the order the
# sections run in and the JSON they fill.
try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _gpu_common import REPO, ensure_importable, free_cuda, log, tiny_qwen2
    from _gpu_engine import check_engine, diag_engine
    from _gpu_fsdp import check_fsdp
    from _gpu_loss import check_loss
    from _gpu_scorer import check_scorer
except ImportError:  # pragma: no cover
    from bench._gpu_common import REPO, ensure_importable, free_cuda, log, tiny_qwen2
    from bench._gpu_engine import check_engine, diag_engine
    from bench._gpu_fsdp import check_fsdp
    from bench._gpu_loss import check_loss
    from bench._gpu_scorer import check_scorer


# ---------------------------------------------------------------------------------------------- benches

def run_benches(args: argparse.Namespace, res: dict) -> None:
    out = res.setdefault("benches", {})
    for script, extra in (("bench_loss_memory.py", args.bench_loss_args),
                          ("bench_scoring_memory.py", args.bench_score_args)):
        cmd = [sys.executable, str(REPO / "bench" / script), "--device", args.device] + extra.split()
        log(f"[bench] {' '.join(cmd[1:])}")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.bench_timeout, cwd=REPO)
            text = proc.stdout + (f"\n[stderr tail]\n{proc.stderr[-3000:]}" if proc.returncode else "")
            rc = proc.returncode
        except subprocess.TimeoutExpired as exc:
            text, rc = f"timed out after {args.bench_timeout} s\n{exc.stdout or ''}", -1
        out[script] = {"cmd": " ".join(cmd[1:]), "rc": rc, "seconds": time.perf_counter() - t0, "output": text}
        for line in text.rstrip().splitlines():
            log(f"    {line}")


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="path of the JSON of figures")
    p.add_argument("--device", default="cuda", help="cuda (the point) or cpu (small sizes, to check the logic)")
    p.add_argument("--sections", default="engine,scorer,loss,fsdp,benches",
                   help="comma list of sections to run: engine,scorer,loss,fsdp,benches and the optional diag")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--gen-hidden", type=int, default=256)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--eos-boost", type=float, default=9.0, help="norm-ish scale of the EOS rows of the random LM head")
    p.add_argument("--alone", type=int, default=8, help="requests re-run alone for the reproducibility check")
    p.add_argument("--score-lengths", type=int, nargs="+", default=[1536, 700, 300, 64])
    p.add_argument("--score-k", type=int, default=16)
    p.add_argument("--loss-tokens", type=int, default=4096)
    p.add_argument("--loss-hidden", type=int, default=896)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--loss-repeats", type=int, default=3)
    p.add_argument("--fsdp-batch", type=int, default=4)
    p.add_argument("--fsdp-tokens", type=int, default=1024)
    p.add_argument("--fsdp-hidden", type=int, default=512)
    p.add_argument("--fsdp-chunk", type=int, default=1024)
    p.add_argument("--fsdp-steps", type=int, default=5)
    p.add_argument("--fsdp-lr", type=float, default=1e-3)
    p.add_argument("--master-port", type=int, default=29517)
    p.add_argument("--bench-loss-args", default="", help="extra args for bench/bench_loss_memory.py")
    p.add_argument("--bench-score-args", default="", help="extra args for bench/bench_scoring_memory.py")
    p.add_argument("--bench-timeout", type=int, default=240)
    p.add_argument("--diag-gen-repeats", type=int, default=3, help="diag: timed repeats of the full generate call")
    p.add_argument("--sdpa-backend", default="default", choices=["default", "math", "efficient", "flash", "cudnn"],
                   help="restrict torch's SDPA to one backend for the whole run (default: torch's choice)")
    p.add_argument("--small", action="store_true", help="CPU-sized problem (implied by --device cpu)")
    args = p.parse_args()
    if args.device == "cpu" or args.small:
        (args.prompts, args.samples, args.new_tokens, args.prompt_max, args.alone,
         args.diag_gen_repeats) = 4, 2, 24, 48, 2, 1
        args.gen_hidden, args.score_lengths = 64, [96, 40, 17]
        args.loss_tokens, args.loss_hidden, args.loss_chunk, args.loss_repeats = 256, 64, 100, 1
        args.fsdp_batch, args.fsdp_tokens, args.fsdp_hidden, args.fsdp_chunk, args.fsdp_steps = 4, 64, 64, 50, 3
        args.eos_boost = 12.0
        args.bench_loss_args = args.bench_loss_args or "--tokens 256 --hidden 32 --vocab 8192 --big-batch 2"
        args.bench_score_args = args.bench_score_args or "--tokens 256 --vocab 8192 --chunk 64"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
        import transformers

    how = ensure_importable()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        dev = torch.device("cuda", torch.cuda.current_device())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    res: dict[str, Any] = {
        "env": {
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "brts_import": how, "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "argv": sys.argv[1:],
        },
        "errors": {},
    }  # fmt: skip
    if args.sdpa_backend != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[args.sdpa_backend]
        sdpa_kernel([backend]).__enter__()  # for the whole process
    res["env"]["sdpa_backend"] = args.sdpa_backend
    log(f"gpu_check: {res['env']}")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    shared: dict[str, Any] = {}

    def section(name: str, fn: Callable[[], Any]) -> None:
        if name not in sections:
            return
        t0 = time.perf_counter()
        try:
            r = fn()
            if isinstance(r, dict):
                shared.update(r)
        except Exception as exc:  # record and go on: one device call must bring back every section it can
            tb = traceback.format_exc()
            res["errors"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": tb}
            log(f"!!! section {name} FAILED: {type(exc).__name__}: {exc}\n{tb}")
        res.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        free_cuda()
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))  # keep what we have if a later one dies

    section("engine", lambda: check_engine(args, dev, res))
    if "scorer" in sections and "model_cpu" not in shared:
        from brts.shared.tokenizer import bundled_tokenizer_dir, load_tokenizer

        shared["model_cpu"] = tiny_qwen2(args.vocab, args.gen_hidden, 4, 4, 2, 4096, seed=0)
        shared["tokenizer"] = load_tokenizer(bundled_tokenizer_dir())
    section("scorer", lambda: check_scorer(args, dev, res, shared["model_cpu"], shared["tokenizer"]))
    shared.clear()
    section("loss", lambda: check_loss(args, dev, res))
    section("fsdp", lambda: check_fsdp(args, dev, res))
    section("benches", lambda: run_benches(args, res))
    section("diag", lambda: diag_engine(args, dev, res))
    Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    log(f"\nerrors: {list(res['errors']) or 'none'}; JSON written to {args.out}")


if __name__ == "__main__":
    main()
