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
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3
MIB = 1024**2


# ---------------------------------------------------------------------------------------------- import shim

def ensure_importable() -> str:
    """Make ``brts`` importable: installed already, or through a folder of symlinks mirroring pyproject's
    package-dir mapping (exported in PYTHONPATH so the bench subprocesses see it too)."""
    try:
        import brts.shared.engines.hf  # noqa: F401
        import brts.trainer.losses  # noqa: F401

        return "installed"
    except ImportError:
        pass
    shim = Path(tempfile.gettempdir()) / "brts_import_shim"
    pkg = shim / "brts"
    pkg.mkdir(parents=True, exist_ok=True)
    for entry in (REPO / "brts").iterdir():
        link = pkg / entry.name
        if entry.suffix == ".py" and not link.exists():
            link.symlink_to(entry)
    for name, folder in (("shared", "shared"), ("server", "server"), ("trainer", "trainer"), ("proto", "proto")):
        link = pkg / name
        if not link.exists():
            link.symlink_to(REPO / folder, target_is_directory=True)
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(shim)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    for mod in [m for m in sys.modules if m == "brts" or m.startswith("brts.")]:
        del sys.modules[mod]
    import brts.shared.engines.hf  # noqa: F401

    return f"shim at {shim}"


# ---------------------------------------------------------------------------------------------- helpers

def log(msg: str = "") -> None:
    print(msg, flush=True)


def sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev: Any) -> int:
    import torch

    if dev.type != "cuda":
        return 0
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    return torch.cuda.memory_allocated(dev)


def peak_above(dev: Any, base: int) -> int | None:
    import torch

    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev) - base)


def gib(x: int | None) -> str:
    return "n/a (CPU)" if x is None else f"{x / GIB:.3f} GiB"


def rel_err(a: Any, b: Any) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tiny_qwen2(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, ctx: int, seed: int) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=ctx,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


# ---------------------------------------------------------------------------------------------- 1. hf engine

def engine_setup(args: argparse.Namespace, dev: Any) -> tuple[Any, Any, Any, list, Any]:
    """The random tiny Qwen2 (CPU fp32 master copy and a bf16 copy on ``dev``), tokenizer, requests, sampling."""
    import torch

    from brts.shared.engines.base import GenerationRequest, SamplingParams
    from brts.shared.engines.hf import HFEngine
    from brts.shared.tokenizer import bundled_tokenizer_dir, load_tokenizer

    tok = load_tokenizer(bundled_tokenizer_dir())
    model = tiny_qwen2(args.vocab, args.gen_hidden, 4, 4, 2, 4096, seed=0)
    eos = HFEngine(model, tok).eos_token_ids  # only to read the EOS ids the engine derives
    # A random head makes every token ~1/V likely, so EOS would never come: give the EOS rows a large weight
    # vector so that EOS becomes likely at some positions (which depend on the context) and some samples stop.
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for e in eos:
            model.lm_head.weight[e] = torch.randn(args.gen_hidden, generator=g) * args.eos_boost / math.sqrt(args.gen_hidden)
    model_bf16 = copy.deepcopy(model).to(device=dev, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(123)
    lengths = torch.randint(args.prompt_min, args.prompt_max + 1, (args.prompts,), generator=g).tolist()
    requests = [
        GenerationRequest(
            tuple(torch.randint(0, 151_643, (L,), generator=g).tolist()),
            tuple(1000 * i + j for j in range(args.samples)),
        )
        for i, L in enumerate(lengths)
    ]
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new_tokens)
    return model, model_bf16, tok, requests, sampling


def check_engine(args: argparse.Namespace, dev: Any, res: dict) -> dict:
    import torch

    from brts.shared.engines.base import SamplingParams
    from brts.shared.engines.hf import HFEngine

    model, model_bf16, tok, requests, sampling = engine_setup(args, dev)
    engine = HFEngine(model_bf16, tok)
    eos = engine.eos_token_ids
    out: dict[str, Any] = {
        "model": f"Qwen2ForCausalLM random, vocab {args.vocab}, hidden {args.gen_hidden}, 4 layers, 4 heads, 2 kv heads, bf16, sdpa",
        "eos_token_ids": list(eos),
        "engine_max_batch_size": engine.max_batch_size,
        "engine_max_batch_tokens": engine.max_batch_tokens,
    }
    res["engine"] = out
    n_prompts, n_samples, new = args.prompts, args.samples, args.new_tokens
    lengths = [len(r.prompt_ids) for r in requests]
    out.update(prompts=n_prompts, samples=n_samples, max_new_tokens=new, prompt_lengths=[min(lengths), max(lengths)],
               temperature=args.temperature, top_p=args.top_p)
    log(f"[1] hf engine: {n_prompts} prompts (lengths {min(lengths)}..{max(lengths)}) x {n_samples} samples x "
        f"{new} new tokens, T={args.temperature}, top_p={args.top_p}, eos={list(eos)}")

    engine.generate(requests[:2], SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=8))  # warm-up
    base = reset_peak(dev)
    sync(dev)
    t0 = time.perf_counter()
    gens = engine.generate(requests, sampling)
    sync(dev)
    secs = time.perf_counter() - t0
    n_tok = sum(len(s.token_ids) for per in gens for s in per)
    out.update(seconds=secs, generated_tokens=n_tok, tokens_per_s=n_tok / secs, peak_alloc_bytes=peak_above(dev, base))
    log(f"    generate: {n_tok} tokens in {secs:.2f} s = {n_tok / secs:,.0f} tokens/s "
        f"(engine default max_batch_size={engine.max_batch_size}); peak alloc above model {gib(out['peak_alloc_bytes'])}")

    # same call, one decode loop for all rows
    wide = HFEngine(model_bf16, tok, max_batch_size=n_prompts * n_samples, max_batch_tokens=1 << 30)
    sync(dev)
    t0 = time.perf_counter()
    gens_wide = wide.generate(requests, sampling)
    sync(dev)
    secs_w = time.perf_counter() - t0
    n_tok_w = sum(len(s.token_ids) for per in gens_wide for s in per)
    out.update(one_loop_seconds=secs_w, one_loop_tokens_per_s=n_tok_w / secs_w)
    log(f"    generate with max_batch_size={n_prompts * n_samples} (one loop): {n_tok_w / secs_w:,.0f} tokens/s")

    # EOS convention
    eos_set = set(eos)
    bad: list[str] = []
    n_stop = n_len = 0
    stop_lengths = []
    for i, per in enumerate(gens):
        if len(per) != n_samples:
            bad.append(f"request {i}: {len(per)} generations for {n_samples} seeds")
        for j, s in enumerate(per):
            ids = s.token_ids
            if s.finish_reason == "stop":
                n_stop += 1
                stop_lengths.append(len(ids))
                if not ids or ids[-1] not in eos_set:
                    bad.append(f"[{i}][{j}] stop without a final EOS")
                if any(t in eos_set for t in ids[:-1]):
                    bad.append(f"[{i}][{j}] stop with an EOS before the end")
                if len(ids) > new:
                    bad.append(f"[{i}][{j}] stop longer than max_new_tokens ({len(ids)})")
            elif s.finish_reason == "length":
                n_len += 1
                if len(ids) != new:
                    bad.append(f"[{i}][{j}] length with {len(ids)} != {new} tokens")
                if any(t in eos_set for t in ids):
                    bad.append(f"[{i}][{j}] length sample holds an EOS")
            else:
                bad.append(f"[{i}][{j}] finish_reason {s.finish_reason!r}")
            if any(not 0 <= t < engine.vocab_size for t in ids):
                bad.append(f"[{i}][{j}] token outside the vocabulary")
    out["eos_check"] = {
        "stop_samples": n_stop, "length_samples": n_len, "violations": len(bad), "first_violations": bad[:10],
        "stop_length_min_mean_max": [min(stop_lengths), sum(stop_lengths) / len(stop_lengths), max(stop_lengths)] if stop_lengths else None,
    }  # fmt: skip
    log(f"    EOS convention: {n_stop} stop / {n_len} length samples, {len(bad)} violations"
        + (f": {bad[:3]}" if bad else " (every stop ends with exactly one EOS, none before; every length has "
           f"{new} tokens, no EOS)"))

    def same_share(a: list, b: list) -> dict:
        pairs = [(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb)]
        same = sum(x.token_ids == y.token_ids and x.finish_reason == y.finish_reason for x, y in pairs)
        first_div = []
        for x, y in pairs:
            if x.token_ids != y.token_ids:
                first_div.append(next((p for p, (u, v) in enumerate(zip(x.token_ids, y.token_ids)) if u != v),
                                      min(len(x.token_ids), len(y.token_ids))))
        return {"samples": len(pairs), "identical": same, "share_identical": same / len(pairs) if pairs else float("nan"),
                "first_divergence_min_mean": [min(first_div), sum(first_div) / len(first_div)] if first_div else None}

    # reproducibility: the whole batch again; a few requests alone; the one-loop batch
    rep = {"batch_again_vs_batch": same_share(engine.generate(requests, sampling), gens)}
    rep["one_loop_vs_default_groups"] = same_share(gens_wide, gens)
    idx = list(range(0, n_prompts, max(1, n_prompts // args.alone)))[: args.alone]
    alone = [engine.generate([requests[i]], sampling)[0] for i in idx]
    rep["alone_vs_batch"] = same_share(alone, [gens[i] for i in idx])
    rep["alone_again_vs_alone"] = same_share([engine.generate([requests[i]], sampling)[0] for i in idx], alone)
    # fp32 copy of the same weights, for comparison
    model_fp32 = copy.deepcopy(model).to(device=dev, dtype=torch.float32).eval()
    eng32 = HFEngine(model_fp32, tok)
    sub = [requests[i] for i in idx] + [requests[i] for i in range(n_prompts) if i not in idx][: args.alone]
    batch32 = eng32.generate(sub, sampling)
    alone32 = [eng32.generate([r], sampling)[0] for r in sub[: len(idx)]]
    rep["fp32_alone_vs_batch"] = same_share(alone32, batch32[: len(idx)])
    rep["fp32_vs_bf16_same_batch_position"] = same_share(alone32, alone)  # fp32 alone vs bf16 alone, same seeds
    # a peaked sampling distribution (top_k=20): a near-uniform random model flips a token on the smallest
    # rounding difference, so this shows whether that alone explains the batch-vs-alone differences
    peaked = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=20, max_new_tokens=new)
    sub16 = [requests[i] for i in idx]
    b16k = engine.generate(sub16 + [requests[i] for i in range(n_prompts) if i not in idx][: args.alone], peaked)
    rep["top_k20_bf16_alone_vs_batch"] = same_share([engine.generate([r], peaked)[0] for r in sub16], b16k[: len(idx)])
    b32k = eng32.generate(sub, peaked)
    rep["top_k20_fp32_alone_vs_batch"] = same_share([eng32.generate([r], peaked)[0] for r in sub[: len(idx)]], b32k[: len(idx)])
    out["reproducibility"] = rep
    for key, v in rep.items():
        log(f"    reproducibility {key}: {v['identical']}/{v['samples']} identical ({100 * v['share_identical']:.0f}%)"
            + (f", first divergence at token {v['first_divergence_min_mean'][0]} (mean {v['first_divergence_min_mean'][1]:.1f})"
               if v["first_divergence_min_mean"] else ""))
    del engine, wide, eng32, model_fp32
    return {"model_cpu": model, "tokenizer": tok}


# ---------------------------------------------------------------------------------------------- 2. scorer

def check_scorer(args: argparse.Namespace, dev: Any, res: dict, model_cpu: Any, tok: Any) -> None:
    import numpy as np
    import torch

    from brts.shared.engines.base import ScoreItem
    from brts.shared.engines.hf import HFEngine

    out: dict[str, Any] = {}
    res["scorer"] = out
    g = torch.Generator().manual_seed(5)
    items = []
    for L in args.score_lengths:
        ids = torch.randint(0, 151_643, (L,), generator=g)
        rs = max(1, L // 4)
        cand = torch.randint(0, args.vocab, (L - rs, 8), generator=g)
        cand[:, -1] = -1
        items.append(ScoreItem(tuple(ids.tolist()), rs, cand.numpy()))
    k = args.score_k
    out.update(lengths=list(args.score_lengths), k=k, candidates_per_row=8)
    log(f"[2] scorer: items of {list(args.score_lengths)} tokens, response from L//4, top-{k} + 8 candidate ids (one -1)")

    def reference(model: Any, item: ScoreItem) -> tuple[Any, Any, Any]:
        with torch.inference_mode():
            ids = torch.tensor(item.token_ids, device=dev)[None]
            logp = model(ids).logits[0].float().log_softmax(-1)[item.response_start - 1 : -1]
            top = logp.topk(k, dim=-1)
            c = torch.from_numpy(item.candidate_ids).to(dev)
            got = logp.gather(1, c.clamp(min=0)).masked_fill(c < 0, float("-inf"))
            return top.values.cpu().numpy(), top.indices.cpu().numpy(), got.cpu().numpy()

    def compare(name: str, dtype: Any) -> dict:
        model = copy.deepcopy(model_cpu).to(device=dev, dtype=dtype).eval()
        scorer = HFEngine(model, tok).scorer()
        scorer.score(items[-1:], k)  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        outs = scorer.score(items, k)
        sync(dev)
        secs = time.perf_counter() - t0
        d_top = d_cand = 0.0
        id_same = id_total = 0
        inf_mismatch = 0
        refs = []
        for item, o in zip(items, outs):
            rv, ri, rc = reference(model, item)
            refs.append(rv)
            d_top = max(d_top, float(np.abs(o.topk.logprobs - rv).max()))
            id_same += int((o.topk.ids == ri).sum())
            id_total += ri.size
            finite = np.isfinite(rc)
            inf_mismatch += int((np.isfinite(o.candidate_logprobs) != finite).sum())
            d_cand = max(d_cand, float(np.abs(o.candidate_logprobs[finite] - rc[finite]).max()))
        r = {"max_abs_diff_topk_logprobs": d_top, "max_abs_diff_candidate_logprobs": d_cand,
             "topk_ids_identical_share": id_same / id_total, "candidate_inf_mismatches": inf_mismatch,
             "score_seconds": secs, "rows": sum(len(i.token_ids) - i.response_start for i in items)}
        log(f"    {name}: scorer vs plain forward: max|Δ top-{k} log-prob| {d_top:.3e}, max|Δ candidate log-prob| "
            f"{d_cand:.3e}, top-k ids identical {100 * id_same / id_total:.3f}%, -inf mismatches {inf_mismatch}; "
            f"score() {secs * 1000:.1f} ms for {r['rows']} rows")
        del scorer, model
        free_cuda()
        return r, outs, refs

    out["fp32"], outs32, refs32 = compare("fp32 (TF32 off)", torch.float32)
    out["fp32"]["tolerance"] = 1e-4
    out["fp32"]["within_tolerance"] = out["fp32"]["max_abs_diff_topk_logprobs"] <= 1e-4 and out["fp32"]["max_abs_diff_candidate_logprobs"] <= 1e-4
    out["bf16"], outs16, _ = compare("bf16", torch.bfloat16)
    d = max(float(np.abs(o.topk.logprobs - r).max()) for o, r in zip(outs16, refs32))
    out["bf16"]["max_abs_diff_topk_logprobs_vs_fp32_reference"] = d
    log(f"    bf16 scorer vs fp32 plain forward of the same weights (bf16 rounding itself): max|Δ| {d:.3e}")


# ---------------------------------------------------------------------------------------------- 3. loss path

def check_loss(args: argparse.Namespace, dev: Any, res: dict) -> None:
    import torch

    from brts.trainer.losses import dual_branch_loss
    from brts.trainer.topk_logprobs import chunked_topk_logprobs

    T, H, V, K = args.loss_tokens, args.loss_hidden, args.vocab, 16
    out: dict[str, Any] = {"T": T, "H": H, "V": V, "K": K, "chunk": args.loss_chunk, "input_dtype": "bfloat16"}
    res["loss"] = out
    log(f"[3] loss path: T={T}, H={H}, V={V:,}, K={K}, bf16 hidden states and lm_head, chunk {args.loss_chunk}")
    g = torch.Generator().manual_seed(11)
    h_sc0 = torch.randn(T, H, generator=g).to(dev, torch.bfloat16)
    h_tc0 = torch.randn(T, H, generator=g).to(dev, torch.bfloat16)
    w0 = (torch.randn(V, H, generator=g) * (2.0 / math.sqrt(H))).to(dev, torch.bfloat16)
    teacher_sc = torch.log_softmax(torch.randn(T, 64, generator=g) * 2, -1).sort(-1, descending=True).values[:, :K].to(dev)
    teacher_ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(8)]).repeat(T // 8 + 1, 1)[:T].to(dev)
    teacher_ids[::97, -1] = -1  # some padded teacher entries
    teacher_tc = torch.log_softmax(torch.randn(T, 64, generator=g) * 2, -1).sort(-1, descending=True).values[:, :K].to(dev)
    teacher_tc = teacher_tc.masked_fill(teacher_ids < 0, float("-inf"))
    mask = torch.rand(T, generator=g).to(dev) < 0.9

    def run(mode: str, dtype: Any) -> tuple[dict, dict]:
        h_sc = h_sc0.detach().clone().to(dtype).requires_grad_(True)
        h_tc = h_tc0.detach().clone().to(dtype).requires_grad_(True)
        w = w0.detach().clone().to(dtype).requires_grad_(True)

        def step() -> tuple[Any, Any]:
            for p in (h_sc, h_tc, w):
                p.grad = None
            if mode.startswith("chunked"):
                up = mode == "chunked"
                sc = chunked_topk_logprobs(h_sc, w, K, chunk_size=args.loss_chunk, upcast_matmul=up)
                a, sc_ids = sc.topk_logprobs, sc.topk_ids
                ell = chunked_topk_logprobs(h_tc, w, 0, teacher_ids, chunk_size=args.loss_chunk, upcast_matmul=up).gathered_logprobs
            else:  # naive: full fp32 logits and log_softmax, kept for backward
                lp_sc = torch.log_softmax(h_sc.float() @ w.float().t(), dim=-1)
                top = lp_sc.topk(K, dim=-1)
                a, sc_ids = top.values, top.indices
                lp_tc = torch.log_softmax(h_tc.float() @ w.float().t(), dim=-1)
                ell = lp_tc.gather(-1, teacher_ids.clamp(min=0)).masked_fill(teacher_ids < 0, float("-inf"))
            loss = dual_branch_loss(a, teacher_sc, mask, ell, teacher_tc, mask, lam=1.0)
            loss.total.backward()
            return loss, sc_ids

        step()  # warm-up (and kernels' first-call costs)
        times = []
        base = reset_peak(dev)
        for _ in range(args.loss_repeats):
            sync(dev)
            t0 = time.perf_counter()
            loss, ids = step()
            sync(dev)
            times.append(time.perf_counter() - t0)
        peak = peak_above(dev, base)
        r = {"seconds_min": min(times), "seconds_all": times, "peak_alloc_above_inputs_bytes": peak,
             "loss": float(loss.total.detach()), "l_sc": float(loss.student_context.detach()),
             "l_tc": float(loss.teacher_context.detach())}
        grads = {"h_sc": h_sc.grad.detach().float().clone(), "h_tc": h_tc.grad.detach().float().clone(),
                 "w": w.grad.detach().float().clone(), "ids": ids.detach().clone()}
        del h_sc, h_tc, w, loss
        return r, grads

    results = {}
    grads = {}
    for mode, dtype, label in (
        ("naive", torch.bfloat16, "naive fp32 logits (bf16 leaves)"),
        ("chunked", torch.bfloat16, "chunked, upcast_matmul=True"),
        ("chunked_bf16mm", torch.bfloat16, "chunked, upcast_matmul=False"),
        ("naive", torch.float32, "naive fp32 (fp32 leaves)"),
        ("chunked", torch.float32, "chunked fp32 (fp32 leaves)"),
    ):
        key = f"{mode}/{str(dtype).replace('torch.', '')}"
        r, gr = run(mode, dtype)
        r["label"] = label
        results[key], grads[key] = r, gr
        free_cuda()
        log(f"    {label:<34} fwd+bwd {r['seconds_min'] * 1000:8.1f} ms   peak above inputs {gib(r['peak_alloc_above_inputs_bytes']):>12}   "
            f"loss {r['loss']:.6f} (SC {r['l_sc']:.6f}, TC {r['l_tc']:.6f})")
    out["runs"] = results

    def agree(x: str, ref: str) -> dict:
        a, b = grads[x], grads[ref]
        return {"loss_abs_diff": abs(results[x]["loss"] - results[ref]["loss"]),
                "loss_rel_diff": abs(results[x]["loss"] - results[ref]["loss"]) / abs(results[ref]["loss"]),
                "grad_rel_err_h_sc": rel_err(a["h_sc"], b["h_sc"]), "grad_rel_err_h_tc": rel_err(a["h_tc"], b["h_tc"]),
                "grad_rel_err_w": rel_err(a["w"], b["w"]),
                "sc_topk_ids_identical_share": float((a["ids"] == b["ids"]).float().mean())}

    out["agreement"] = {
        "chunked_vs_naive_bf16_inputs": agree("chunked/bfloat16", "naive/bfloat16"),
        "chunked_bf16mm_vs_naive_bf16_inputs": agree("chunked_bf16mm/bfloat16", "naive/bfloat16"),
        "chunked_vs_naive_fp32_inputs": agree("chunked/float32", "naive/float32"),
        "naive_bf16_inputs_vs_naive_fp32_inputs": agree("naive/bfloat16", "naive/float32"),
    }
    for name, a in out["agreement"].items():
        log(f"    {name}: |Δloss| {a['loss_abs_diff']:.2e} (rel {a['loss_rel_diff']:.2e}); grad rel err h_sc "
            f"{a['grad_rel_err_h_sc']:.2e}, h_tc {a['grad_rel_err_h_tc']:.2e}, W {a['grad_rel_err_w']:.2e}; "
            f"SC top-k ids identical {100 * a['sc_topk_ids_identical_share']:.3f}%")
    n, c, c2 = results["naive/bfloat16"], results["chunked/bfloat16"], results["chunked_bf16mm/bfloat16"]
    if dev.type == "cuda":
        out["ratios"] = {
            "chunked_over_naive_peak": c["peak_alloc_above_inputs_bytes"] / n["peak_alloc_above_inputs_bytes"],
            "chunked_over_naive_time": c["seconds_min"] / n["seconds_min"],
            "chunked_bf16mm_over_naive_peak": c2["peak_alloc_above_inputs_bytes"] / n["peak_alloc_above_inputs_bytes"],
            "chunked_bf16mm_over_naive_time": c2["seconds_min"] / n["seconds_min"],
        }
        log(f"    ratios chunked/naive (bf16 inputs): peak {out['ratios']['chunked_over_naive_peak']:.3f}, time "
            f"{out['ratios']['chunked_over_naive_time']:.2f}; upcast_matmul=False: peak "
            f"{out['ratios']['chunked_bf16mm_over_naive_peak']:.3f}, time {out['ratios']['chunked_bf16mm_over_naive_time']:.2f}")


# ---------------------------------------------------------------------------------------------- 4. FSDP2

def check_fsdp(args: argparse.Namespace, dev: Any, res: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from brts.trainer.losses import dual_branch_loss
    from brts.trainer.topk_logprobs import chunked_topk_logprobs

    out: dict[str, Any] = {}
    res["fsdp2"] = out
    backend = "nccl" if dev.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.master_port))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        B, T, K, H, V = args.fsdp_batch, args.fsdp_tokens, 16, args.fsdp_hidden, args.vocab
        out.update(backend=backend, batch=B, tokens=T, hidden=H, layers=4, vocab=V, K=K,
                   mp="param_dtype=bf16, reduce_dtype=fp32, fp32 master params")
        log(f"[4] FSDP2: {backend}, world 1, Qwen2 hidden {H}, 4 layers, vocab {V:,}; batch {B} x {T} "
            f"(rows 0..{B // 2 - 1} student rollouts -> SC branch, rows {B // 2}..{B - 1} teacher trajectories -> TC branch)")
        lm = tiny_qwen2(V, H, 4, 8, 2, max(T, 2048), seed=3).to(dev)  # fp32 master weights
        lm.config.use_cache = False

        class Student(nn.Module):
            """Root FSDP unit: owns embed/norm/lm_head, so its pre-forward hook unshards lm_head.weight here."""

            def __init__(self, lm: nn.Module) -> None:
                super().__init__()
                self.lm = lm

            def forward(self, input_ids: torch.Tensor, tc_ids: torch.Tensor, chunk: int) -> tuple:
                hidden = self.lm.model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
                half = input_ids.shape[0] // 2
                w = self.lm.lm_head.weight
                sc = chunked_topk_logprobs(hidden[:half], w, K, chunk_size=chunk)
                tc = chunked_topk_logprobs(hidden[half:], w, 0, tc_ids, chunk_size=chunk).gathered_logprobs
                return sc.topk_ids, sc.topk_logprobs, tc, hidden.dtype, w.dtype

        model = Student(lm)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in lm.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        n_params = sum(p.numel() for p in model.parameters())
        out["params"] = n_params
        opt = torch.optim.AdamW(model.parameters(), lr=args.fsdp_lr, weight_decay=0.0)

        g = torch.Generator().manual_seed(21)
        ids = torch.randint(0, 151_643, (B, T), generator=g).to(dev)
        half = B // 2
        mask = torch.ones(B, T - 1, dtype=torch.bool, device=dev)
        mask[:, : T // 8] = False  # the prompt part carries no loss
        # A fixed random teacher: full log-probs at every student-rollout position (SC needs log q at the student's
        # own, changing top-K ids), and its own top-K (ids + full-vocabulary log-probs) on the teacher trajectories.
        with torch.no_grad():
            gd = torch.Generator(device=dev).manual_seed(22)
            teacher_full = torch.log_softmax(torch.randn(half * (T - 1), V, generator=gd, device=dev).mul_(3.0), -1)
            teacher_full = teacher_full.view(half, T - 1, V)
            t_top = torch.log_softmax(torch.randn(half * (T - 1), V, generator=gd, device=dev).mul_(3.0), -1).topk(K, dim=-1)
            tc_ids = t_top.indices.view(half, T - 1, K)
            tc_teacher = t_top.values.view(half, T - 1, K)
            del t_top
        losses, norms, times, dtypes = [], [], [], None
        base = reset_peak(dev)
        for step in range(args.fsdp_steps):
            sync(dev)
            t0 = time.perf_counter()
            sc_ids, a, ell, hdt, wdt = model(ids, tc_ids, args.fsdp_chunk)
            b = teacher_full.gather(-1, sc_ids)
            loss = dual_branch_loss(a, b, mask[:half], ell, tc_teacher, mask[half:], lam=1.0)
            loss.total.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(dev)
            times.append(time.perf_counter() - t0)
            norm_v = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            losses.append([float(x.detach()) for x in (loss.total, loss.student_context, loss.teacher_context)])
            norms.append(float(norm_v))
            dtypes = {"hidden": str(hdt), "lm_head_in_forward": str(wdt),
                      "master_param": str(next(model.parameters()).dtype),
                      "master_param_type": type(next(model.parameters())).__name__}
            log(f"    step {step}: loss {losses[-1][0]:.6f} (SC {losses[-1][1]:.6f}, TC {losses[-1][2]:.6f}), "
                f"grad norm {norms[-1]:.4f}, {times[-1] * 1000:.1f} ms")
        peak = peak_above(dev, base)
        total = [x[0] for x in losses]
        out.update(losses_total_sc_tc=losses, grad_norms=norms, step_seconds=times,
                   step_seconds_after_first_min=min(times[1:]) if len(times) > 1 else times[0],
                   peak_alloc_above_start_bytes=peak,
                   peak_alloc_total_bytes=int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None,
                   dtypes=dtypes, loss_decreased=all(b < a for a, b in zip(total, total[1:])),
                   loss_first_last=[total[0], total[-1]])
        log(f"    dtypes {dtypes}; loss strictly decreasing: {out['loss_decreased']} ({total[0]:.5f} -> {total[-1]:.5f}); "
            f"step time (after step 0) {out['step_seconds_after_first_min'] * 1000:.1f} ms; peak alloc above start {gib(peak)}")
        del model, lm, opt, teacher_full
    finally:
        dist.destroy_process_group()
        free_cuda()


# ---------------------------------------------------------------------------------------------- diag: engine

def diag_engine(args: argparse.Namespace, dev: Any, res: dict) -> None:
    """Where run-to-run differences of one and the same batch come from, and where a decode step's time goes.

    Records every ``_sample`` call (logits, uniforms, chosen ids) of two runs of the same batch: logits that differ
    mean a non-deterministic model forward; equal logits and uniforms with different ids mean a non-deterministic
    sampler. Then re-runs the sampler's pieces on fixed inputs, and times the forward and the sampler per step.
    """
    import torch

    from brts.shared.engines.hf import HFEngine

    out: dict[str, Any] = {}
    res["diag_engine"] = out
    _, model_bf16, tok, requests, sampling = engine_setup(args, dev)
    engine = HFEngine(model_bf16, tok)
    orig = HFEngine._sample
    rec: list = []
    timing = {"sample_s": 0.0, "calls": 0}

    def recorder(logits: Any, u: Any, sp: Any) -> Any:
        sync(dev)
        t0 = time.perf_counter()
        chosen = orig(logits, u, sp)
        sync(dev)
        timing["sample_s"] += time.perf_counter() - t0
        timing["calls"] += 1
        rec.append((logits.detach().clone(), u.detach().clone(), chosen.clone()))
        return chosen

    engine._sample = recorder  # instance attribute shadows the staticmethod; called as self._sample(...)
    req = requests[: max(1, 64 // args.samples)]  # exactly one default group of rows
    engine.generate(req[:1], sampling)
    rec.clear()
    runs = []
    for _ in range(3):
        sync(dev)
        t0 = time.perf_counter()
        gens = engine.generate(req, sampling)
        sync(dev)
        runs.append({"gens": gens, "rec": rec[:], "seconds": time.perf_counter() - t0})
        rec.clear()
    n_rows = sum(len(r.seeds) for r in req)
    steps = len(runs[0]["rec"])
    out.update(rows=n_rows, steps_run0=steps, seconds_per_run=[r["seconds"] for r in runs],
               sample_seconds_total_3_runs=timing["sample_s"], sample_calls=timing["calls"])
    log(f"[diag] one group of {n_rows} rows, {steps} steps/run: runs took {[round(r['seconds'], 2) for r in runs]} s; "
        f"_sample {1000 * timing['sample_s'] / max(1, timing['calls']):.1f} ms/step (synchronised) of "
        f"{1000 * sum(r['seconds'] for r in runs) / max(1, timing['calls']):.1f} ms/step")

    def first_difference(r0: list, r1: list) -> dict:
        for step, ((l0, u0, c0), (l1, u1, c1)) in enumerate(zip(r0, r1)):
            if l0.shape != l1.shape:
                return {"step": step, "kind": "batch shape differs (an earlier token differed)"}
            same_logits = torch.equal(l0, l1)
            same_u = torch.equal(u0, u1)
            if not same_logits or not same_u or not torch.equal(c0, c1):
                d = {"step": step, "logits_equal": same_logits, "u_equal": same_u, "chosen_equal": torch.equal(c0, c1)}
                if not same_logits:
                    d["logits_max_abs_diff"] = float((l0.float() - l1.float()).abs().max())
                    d["rows_with_logit_diff"] = int((l0 != l1).any(-1).sum())
                if same_logits and same_u:
                    d["rows_chosen_differ"] = int((c0 != c1).sum())
                    d["kind"] = "sampler non-deterministic on identical inputs"
                else:
                    d["kind"] = "model forward non-deterministic" if not same_logits else "uniforms differ"
                return d
        return {"step": None, "kind": "identical"}

    out["run1_vs_run0"] = first_difference(runs[0]["rec"], runs[1]["rec"])
    out["run2_vs_run0"] = first_difference(runs[0]["rec"], runs[2]["rec"])
    same = [sum(a.token_ids == b.token_ids for pa, pb in zip(runs[0]["gens"], r["gens"]) for a, b in zip(pa, pb)) for r in runs[1:]]
    out["samples_identical_run1_run2_vs_run0"] = same
    log(f"    samples identical to run 0: {same} of {n_rows}; first difference run1: {out['run1_vs_run0']}; run2: {out['run2_vs_run0']}")

    # the sampler and its pieces, repeated on fixed inputs (the prefill step of run 0 and a mid-run step)
    pieces: dict[str, Any] = {}
    for label, (logits, u, _) in (("step0", runs[0]["rec"][0]), ("mid", runs[0]["rec"][min(steps - 1, steps // 2)])):
        outs = [orig(logits, u, sampling) for _ in range(20)]
        x = logits.float() / sampling.temperature
        probs = torch.softmax(x, -1)
        sorts = [torch.sort(probs, dim=-1, descending=True) for _ in range(10)]
        tops = [torch.topk(probs, 64, dim=-1) for _ in range(10)]
        cums = [probs.double().cumsum(-1) for _ in range(10)]
        cumf = [probs.cumsum(-1) for _ in range(10)]
        ties = float((sorts[0].values[:, 1:] == sorts[0].values[:, :-1]).float().mean())
        pieces[label] = {
            "rows": int(logits.shape[0]), "logits_dtype": str(logits.dtype),
            "sample_repeat_all_equal": all(torch.equal(outs[0], o) for o in outs),
            "sample_repeat_rows_ever_differ": int(torch.stack([(o != outs[0]) for o in outs]).any(0).sum()),
            "sort_values_equal": all(torch.equal(sorts[0].values, s.values) for s in sorts),
            "sort_indices_equal": all(torch.equal(sorts[0].indices, s.indices) for s in sorts),
            "topk_indices_equal": all(torch.equal(tops[0].indices, t.indices) for t in tops),
            "cumsum_f64_equal": all(torch.equal(cums[0], c) for c in cums),
            "cumsum_f32_equal": all(torch.equal(cumf[0], c) for c in cumf),
            "adjacent_equal_share_in_sorted_probs": ties,
            "distinct_prob_values_row0": int(torch.unique(probs[0]).numel()),
        }
        # the same rows alone (batch of one) through the sampler: does the batch change a row's pick?
        alone = torch.cat([orig(logits[i : i + 1], u[i : i + 1], sampling) for i in range(logits.shape[0])])
        pieces[label]["sample_alone_vs_batched_rows_differ"] = int((alone != outs[0]).sum())
        # which piece depends on the batch: sort order of tied values, or the cumsum's rounding
        s_alone = [torch.sort(probs[i : i + 1], dim=-1, descending=True) for i in range(probs.shape[0])]
        pieces[label]["sort_indices_alone_vs_batched_rows_differ"] = sum(
            int(not torch.equal(s_alone[i].indices[0], sorts[0].indices[i])) for i in range(probs.shape[0]))
        pieces[label]["sort_values_alone_vs_batched_rows_differ"] = sum(
            int(not torch.equal(s_alone[i].values[0], sorts[0].values[i])) for i in range(probs.shape[0]))
        sv = sorts[0].values
        pieces[label]["cumsum_f32_alone_vs_batched_rows_differ"] = sum(
            int(not torch.equal(sv[i : i + 1].cumsum(-1)[0], sv.cumsum(-1)[i])) for i in range(sv.shape[0]))
        pieces[label]["cumsum_f64_alone_vs_batched_rows_differ"] = sum(
            int(not torch.equal(sv[i : i + 1].double().cumsum(-1)[0], sv.double().cumsum(-1)[i])) for i in range(sv.shape[0]))
        log(f"    sampler pieces on fixed inputs ({label}): {pieces[label]}")
    out["sampler_pieces"] = pieces

    # throughput of the full call (all prompts x samples), repeated: is the tokens/s figure stable?
    engine._sample = orig
    reps = []
    for _ in range(args.diag_gen_repeats):
        sync(dev)
        t0 = time.perf_counter()
        gens = engine.generate(requests, sampling)
        sync(dev)
        secs = time.perf_counter() - t0
        n_tok = sum(len(x.token_ids) for per in gens for x in per)
        reps.append({"seconds": secs, "tokens": n_tok, "tokens_per_s": n_tok / secs})
    out["full_call_repeats"] = reps
    log(f"    full call ({len(requests)} x {args.samples} x {args.new_tokens}) repeated: "
        f"{[round(r['tokens_per_s']) for r in reps]} tokens/s")

    # profile: a few decode steps of the whole group
    from torch.profiler import ProfilerActivity, profile

    engine._sample = orig
    short = type(sampling)(temperature=sampling.temperature, top_p=sampling.top_p, max_new_tokens=16)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        engine.generate(req, short)
        sync(dev)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    table_dev = prof.key_averages().table(sort_by=key, row_limit=14)
    table_cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=14)
    out["profile_16_steps_by_device_time"] = table_dev
    out["profile_16_steps_by_cpu_time"] = table_cpu
    log(f"    profile of {n_rows} rows x 16 new tokens, by {key}:\n{table_dev}\n    by cpu_time_total:\n{table_cpu}")


# ---------------------------------------------------------------------------------------------- benches

def run_benches(args: argparse.Namespace, res: dict) -> None:
    out = res.setdefault("benches", {})
    for script, extra in (("bench_loss_memory.py", args.bench_loss_args), ("bench_scoring_memory.py", args.bench_score_args)):
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
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
        args.prompts, args.samples, args.new_tokens, args.prompt_max, args.alone, args.diag_gen_repeats = 4, 2, 24, 48, 2, 1
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
            "transformers": transformers.__version__, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
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
