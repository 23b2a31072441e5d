"""gpu_check section 2: the exact scorer in fp32 (TF32 off) and bf16 against a plain forward's top-K and gather.

See bench/gpu_check.py's docstring for what is checked and why.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _gpu_common import free_cuda, log, sync
except ImportError:  # pragma: no cover
    from bench._gpu_common import free_cuda, log, sync


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
    log(f"[2] scorer: items of {list(args.score_lengths)} tokens, response from L//4, "
        f"top-{k} + 8 candidate ids (one -1)")

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
    out["fp32"]["within_tolerance"] = (
        out["fp32"]["max_abs_diff_topk_logprobs"] <= 1e-4 and out["fp32"]["max_abs_diff_candidate_logprobs"] <= 1e-4)
    out["bf16"], outs16, _ = compare("bf16", torch.bfloat16)
    d = max(float(np.abs(o.topk.logprobs - r).max()) for o, r in zip(outs16, refs32))
    out["bf16"]["max_abs_diff_topk_logprobs_vs_fp32_reference"] = d
    log(f"    bf16 scorer vs fp32 plain forward of the same weights (bf16 rounding itself): max|Δ| {d:.3e}")
