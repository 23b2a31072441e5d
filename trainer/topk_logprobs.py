"""Top-K log-probs from the last hidden states without ever holding [positions × vocabulary] logits.

Both BRTS branches need only a handful of log-probs per position (brts-reference §8): the student's
top-K ids and their full-vocabulary-normalised log-probs (student-context branch, §8.1), and the
student's log-probs at given ids (the teacher's top-K on the selected trajectory, §8.3). The
reference materialises full logits for up to 32,768 tokens per micro-batch, ~10 GB in bf16 and ~20 GB
upcast, and keeps them for backward (brts-reference §10 "Inefficiencies"). Here a custom autograd
function walks over chunks of positions:

* forward: per chunk, logits = hidden_chunk @ Wᵀ (+ bias) in fp32, their logsumexp, top-K, gathers;
  it saves only hidden, W (and bias), the ids and one logsumexp per position;
* backward: per chunk, it recomputes the logits, turns them into softmax p in place, and forms
  ∂L/∂logits = Σ_j g_j (onehot(id_j) − p) over all outputs j of that position (top-K and gathered
  alike, handled in one pass), then accumulates ∂L/∂hidden = (∂L/∂logits) W and ∂L/∂W += (∂L/∂logits)ᵀ h.

So neither pass holds more than one chunk of [chunk × V] logits (plus W-sized buffers: W's fp32 copy
when W is bf16 and ∂L/∂W's fp32 accumulator). The top-K ids carry no gradient (the selection is
piecewise constant); the top-K log-probs do: they are ``a`` in the student-context loss.

Precision: log-softmax always runs in fp32 and log-probs are returned in fp32 (float64 if an input is
float64, which only the tests use, for gradcheck). With
``upcast_matmul=True`` (default) the matmuls run in fp32 too, on upcast bf16 inputs, so bf16 models get
logits without bf16 rounding (for bf16 inputs this equals an fp32 matmul of the same values).
``upcast_matmul=False`` runs the matmuls in the inputs' dtype (fp32 accumulation on GPUs) and only
upcasts the logits, like a stock HF bf16 forward; it is several times faster on tensor-core GPUs and
costs ~3 significant digits on the logits. Gradients come back in the inputs' dtypes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["TopKLogProbs", "chunked_topk_logprobs"]


class TopKLogProbs(NamedTuple):
    """`topk_ids` LongTensor[..., T, k] (sorted by descending log-prob, no grad); `topk_logprobs`
    float32[..., T, k] (with grad); `gathered_logprobs` float32[..., T, K2] at the given ids (with
    grad, -inf where the id is -1) or None when no ids were given."""

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    gathered_logprobs: torch.Tensor | None


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 if any input is float64 (so tests can gradcheck in double)."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _chunk_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, upcast: bool, cdt: torch.dtype
) -> torch.Tensor:
    """Logits [c, V] of one chunk in the compute dtype `cdt`. `weight` is already `cdt` when `upcast`."""
    if upcast:
        logits = h.to(cdt) @ weight.t()
    else:
        logits = (h.to(weight.dtype) @ weight.t()).to(cdt)
    if bias is not None:
        logits.add_(bias.to(cdt))
    return logits


class _ChunkedTopKLogProbsFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        gather_ids: torch.Tensor,
        k: int,
        chunk_size: int,
        upcast: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        k2 = gather_ids.shape[1]
        dev = hidden.device
        cdt = _compute_dtype(hidden.dtype, weight.dtype)
        w = weight.to(cdt) if upcast else weight
        topk_ids = torch.empty((n, k), dtype=torch.long, device=dev)
        topk_lp = torch.empty((n, k), dtype=cdt, device=dev)
        gathered = torch.empty((n, k2), dtype=cdt, device=dev)
        lse = torch.empty((n,), dtype=cdt, device=dev)
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            logits = _chunk_logits(hidden[s:e], w, bias, upcast, cdt)
            vals, ids = logits.topk(k, dim=-1)
            g_ids = gather_ids[s:e]
            g_vals = logits.gather(1, g_ids.clamp_min(0))
            # logsumexp in place (torch.logsumexp would allocate a second [c, V] buffer)
            row_max = logits.amax(dim=-1, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            chunk_lse = logits.sub_(row_max).exp_().sum(dim=-1, keepdim=True).log_().add_(row_max)
            del logits
            topk_ids[s:e] = ids
            topk_lp[s:e] = vals - chunk_lse
            gathered[s:e] = (g_vals - chunk_lse).masked_fill_(g_ids < 0, float("-inf"))
            lse[s:e] = chunk_lse.squeeze(-1)
        ctx.save_for_backward(hidden, weight, bias, torch.cat([topk_ids, gather_ids], dim=1), lse)
        ctx.chunk_size = chunk_size
        ctx.k = k
        ctx.upcast = upcast
        ctx.mark_non_differentiable(topk_ids)
        return topk_ids, topk_lp, gathered

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any,
        _grad_ids: torch.Tensor | None,
        grad_topk: torch.Tensor | None,
        grad_gathered: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, ids, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None
        n, k_all = ids.shape
        k: int = ctx.k
        cdt = lse.dtype
        g_topk = grad_topk if grad_topk is not None else torch.zeros((n, k), dtype=cdt, device=ids.device)
        g_gath = (
            grad_gathered if grad_gathered is not None else torch.zeros((n, k_all - k), dtype=cdt, device=ids.device)
        )
        # one gradient per output log-prob; a -1 id contributes nothing (its output is a constant
        # -inf), and zeroing its upstream grad keeps a stray NaN there out of the row sum below
        g_all = torch.cat([g_topk, g_gath], dim=1).to(cdt).masked_fill(ids < 0, 0.0)
        ids_safe = ids.clamp_min(0)
        upcast: bool = ctx.upcast
        w = weight.to(cdt) if upcast else weight
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=cdt, device=weight.device) if need_b else None
        for s in range(0, n, ctx.chunk_size):
            e = min(n, s + ctx.chunk_size)
            h = hidden[s:e]
            g = g_all[s:e]
            # softmax p, in place on the recomputed logits
            grad_logits = _chunk_logits(h, w, bias, upcast, cdt).sub_(lse[s:e].unsqueeze(-1)).exp_()
            # dL/dlogits_v = sum_j g_j (1[v == id_j] - p_v) = scatter(g) - p * sum_j g_j
            grad_logits.mul_(-g.sum(dim=-1, keepdim=True)).scatter_add_(1, ids_safe[s:e], g)
            if grad_b is not None:
                grad_b.add_(grad_logits.sum(dim=0))
            if upcast:
                if grad_h is not None:
                    grad_h[s:e] = (grad_logits @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w.addmm_(grad_logits.t(), h.to(cdt))
            else:
                gl = grad_logits.to(weight.dtype)
                if grad_h is not None:
                    grad_h[s:e] = (gl @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w.add_(gl.t() @ h.to(weight.dtype))  # low-precision product, fp32 sum
                del gl
            # drop this chunk's [c, V] buffer before the next chunk allocates its own
            del grad_logits
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
        )


def chunked_topk_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    k: int,
    gather_ids: torch.Tensor | None = None,
    chunk_size: int = 1024,
    bias: torch.Tensor | None = None,
    upcast_matmul: bool = True,
) -> TopKLogProbs:
    """Student top-K ids and log-probs, and log-probs at `gather_ids`, chunked over positions.

    `hidden` [T, H] or [B, T, H]: the model's last hidden states (after the final norm), row t
    predicting token t + 1. `lm_head_weight` [V, H] (and optional `bias` [V]): the output projection.
    `k` in [0, V]: how many top ids per position. `gather_ids` LongTensor[..., T, K2] (same leading
    shape as `hidden`) or None: ids whose log-probs to return, -1 for padding (gives -inf and no
    gradient). `chunk_size`: positions per chunk; peak extra memory is about chunk_size × V × 4 bytes.

    All log-probs are normalised over the full vocabulary, at temperature 1, in fp32. Differentiable
    w.r.t. `hidden`, `lm_head_weight` and `bias` through both log-prob outputs.
    """
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [T, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [V, H={hidden.shape[-1]}], got shape {tuple(lm_head_weight.shape)}"
        )
    vocab = lm_head_weight.shape[0]
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must be [V={vocab}], got shape {tuple(bias.shape)}")
    if not 0 <= k <= vocab:
        raise ValueError(f"k must lie in [0, V={vocab}], got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not hidden.is_floating_point() or not lm_head_weight.is_floating_point():
        raise ValueError("hidden and lm_head_weight must be floating point")
    lead = hidden.shape[:-1]
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    if gather_ids is None:
        flat_g = torch.empty((flat_h.shape[0], 0), dtype=torch.long, device=hidden.device)
    else:
        if gather_ids.dim() != hidden.dim() or gather_ids.shape[:-1] != lead:
            raise ValueError(
                f"gather_ids must be [{', '.join(map(str, lead))}, K2] to match hidden, "
                f"got shape {tuple(gather_ids.shape)}"
            )
        if gather_ids.dtype != torch.long:
            raise ValueError(f"gather_ids must be int64, got {gather_ids.dtype}")
        if gather_ids.numel() and (int(gather_ids.min()) < -1 or int(gather_ids.max()) >= vocab):
            raise ValueError(
                f"gather_ids must lie in [-1, V={vocab}), got [{int(gather_ids.min())}, {int(gather_ids.max())}]"
            )
        flat_g = gather_ids.reshape(-1, gather_ids.shape[-1])
    ids, topk_lp, gathered = _ChunkedTopKLogProbsFn.apply(
        flat_h, lm_head_weight, bias, flat_g, k, chunk_size, upcast_matmul
    )
    return TopKLogProbs(
        topk_ids=ids.reshape(*lead, k),
        topk_logprobs=topk_lp.reshape(*lead, k),
        gathered_logprobs=None if gather_ids is None else gathered.reshape(*lead, gather_ids.shape[-1]),
    )
