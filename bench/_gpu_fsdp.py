"""gpu_check section 4: one FSDP2 training step of a small Qwen2 student, repeated on one batch (the loss must fall).

See bench/gpu_check.py's docstring for what is checked and why.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _gpu_common import free_cuda, gib, log, peak_above, reset_peak, sync, tiny_qwen2
except ImportError:  # pragma: no cover
    from bench._gpu_common import free_cuda, gib, log, peak_above, reset_peak, sync, tiny_qwen2


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
            f"(rows 0..{B // 2 - 1} student rollouts -> SC branch, "
            f"rows {B // 2}..{B - 1} teacher trajectories -> TC branch)")
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
            t_top = torch.log_softmax(
                torch.randn(half * (T - 1), V, generator=gd, device=dev).mul_(3.0), -1).topk(K, dim=-1)
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
        log(f"    dtypes {dtypes}; loss strictly decreasing: {out['loss_decreased']} "
            f"({total[0]:.5f} -> {total[-1]:.5f}); "
            f"step time (after step 0) {out['step_seconds_after_first_min'] * 1000:.1f} ms; "
            f"peak alloc above start {gib(peak)}")
        del model, lm, opt, teacher_full
    finally:
        dist.destroy_process_group()
        free_cuda()
