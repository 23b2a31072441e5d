"""gpu_check section 3: the chunked top-K loss path against a naive full-logits one (time, peak memory, agreement
of losses and gradients), forward + backward.

See bench/gpu_check.py's docstring for what is checked and why.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _gpu_common import free_cuda, gib, log, peak_above, rel_err, reset_peak, sync
except ImportError:  # pragma: no cover
    from bench._gpu_common import free_cuda, gib, log, peak_above, rel_err, reset_peak, sync


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
    teacher_sc = (
        torch.log_softmax(torch.randn(T, 64, generator=g) * 2, -1).sort(-1, descending=True).values[:, :K].to(dev))
    teacher_ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(8)]).repeat(T // 8 + 1, 1)[:T].to(dev)
    teacher_ids[::97, -1] = -1  # some padded teacher entries
    teacher_tc = (
        torch.log_softmax(torch.randn(T, 64, generator=g) * 2, -1).sort(-1, descending=True).values[:, :K].to(dev))
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
                ell = chunked_topk_logprobs(
                    h_tc, w, 0, teacher_ids, chunk_size=args.loss_chunk, upcast_matmul=up).gathered_logprobs
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
        return r, grads  # the leaves, their grads and the graph are freed with this frame

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
        log(f"    {label:<34} fwd+bwd {r['seconds_min'] * 1000:8.1f} ms   "
            f"peak above inputs {gib(r['peak_alloc_above_inputs_bytes']):>12}   "
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
            f"{out['ratios']['chunked_bf16mm_over_naive_peak']:.3f}, "
            f"time {out['ratios']['chunked_bf16mm_over_naive_time']:.2f}")
