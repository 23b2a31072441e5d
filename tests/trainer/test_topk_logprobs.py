"""The chunked top-K log-prob path against a full-logits reference, and its peak memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from brts.trainer.losses import student_context_loss, teacher_context_loss
from brts.trainer.topk_logprobs import chunked_topk_logprobs

Tensors4 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Tensors3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _inputs(seed: int, lead: tuple[int, ...], h: int, v: int, k2: int, dtype: torch.dtype = torch.float32) -> Tensors4:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5).to(dtype).requires_grad_(True)
    bias = (torch.randn(v, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_(True)
    gather = torch.randint(-1, v, (*lead, k2), generator=g)
    return hidden, weight, bias, gather


def _naive(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, gather: torch.Tensor
) -> Tensors3:
    """Full-vocabulary reference: log_softmax over materialised fp32 logits."""
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    lp = torch.log_softmax(logits, dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    gathered = lp.gather(-1, gather.clamp_min(0)).masked_fill(gather < 0, float("-inf"))
    return ids, vals, gathered


def _dual_loss(
    topk_lp: torch.Tensor, gathered: torch.Tensor, teacher_sc: torch.Tensor, teacher_tc: torch.Tensor,
    mask: torch.Tensor
) -> torch.Tensor:
    """A loss built on both outputs the way the trainer uses them (§8.1 + §8.3)."""
    return student_context_loss(topk_lp, teacher_sc, mask) + 0.7 * teacher_context_loss(gathered, teacher_tc, mask)


def _teacher(seed: int, shape: tuple[int, ...], gather: torch.Tensor) -> Tensors3:
    g = torch.Generator().manual_seed(seed)
    sc = torch.log_softmax(torch.randn(*shape[:-1], 64, generator=g), -1)[..., : shape[-1]]
    tc = torch.log_softmax(torch.randn(*gather.shape[:-1], 64, generator=g), -1)[..., : gather.shape[-1]]
    tc = tc.masked_fill(gather < 0, float("-inf"))
    mask = torch.rand(shape[:-1], generator=g) < 0.8
    return sc, tc, mask


@pytest.mark.parametrize("lead", [(37,), (2, 19)])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_matches_full_logits_values_and_gradients_fp32(lead: tuple[int, ...], chunk: int) -> None:
    k, k2, h, v = 6, 5, 16, 97
    hidden, weight, bias, gather = _inputs(0, lead, h, v, k2)
    out = chunked_topk_logprobs(hidden, weight, k, gather, chunk_size=chunk, bias=bias)
    ids, vals, gathered = _naive(hidden, weight, bias, k, gather)
    assert out.topk_ids.shape == (*lead, k) and out.gathered_logprobs is not None
    assert torch.equal(out.topk_ids, ids)
    assert out.topk_logprobs.dtype == torch.float32
    torch.testing.assert_close(out.topk_logprobs, vals, atol=1e-5, rtol=0)
    assert torch.equal(torch.isneginf(out.gathered_logprobs), gather < 0)
    torch.testing.assert_close(out.gathered_logprobs, gathered, atol=1e-5, rtol=0)

    sc, tc, mask = _teacher(1, (*lead, k), gather)
    grads = torch.autograd.grad(
        _dual_loss(out.topk_logprobs, out.gathered_logprobs, sc, tc, mask), (hidden, weight, bias)
    )
    ref_loss = _dual_loss(vals, gathered, sc, tc, mask)
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight, bias))
    for got, ref in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32 and got.abs().max() > 0
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64() -> None:
    """Both differentiable outputs at once, against finite differences (float64 end to end)."""
    hidden, weight, bias, gather = _inputs(2, (7,), 4, 11, 3, dtype=torch.float64)

    def fn(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = chunked_topk_logprobs(h, w, 3, gather, chunk_size=3, bias=b)
        assert out.gathered_logprobs is not None
        return out.topk_logprobs, out.gathered_logprobs.masked_fill(gather < 0, 0.0)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_padding_gather_ids_give_minus_inf_and_no_gradient() -> None:
    hidden, weight, _, _ = _inputs(3, (5,), 8, 30, 4)
    gather = torch.tensor([[1, -1, 2, -1]] * 5)
    out = chunked_topk_logprobs(hidden, weight, 2, gather, chunk_size=2)
    assert out.gathered_logprobs is not None
    assert torch.isneginf(out.gathered_logprobs[:, [1, 3]]).all()
    assert torch.isfinite(out.gathered_logprobs[:, [0, 2]]).all()
    # an upstream gradient at a padded entry (even NaN) must not leak into the inputs
    upstream = torch.ones_like(out.gathered_logprobs)
    upstream[:, 1] = float("nan")
    g_pad = torch.autograd.grad(out.gathered_logprobs, (hidden, weight), upstream, retain_graph=True)
    upstream_clean = upstream.clone()
    upstream_clean[:, [1, 3]] = 0.0
    g_clean = torch.autograd.grad(out.gathered_logprobs, (hidden, weight), upstream_clean)
    for a, b in zip(g_pad, g_clean, strict=True):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


def test_outputs_used_alone_and_no_gather() -> None:
    hidden, weight, _, gather = _inputs(4, (9,), 8, 40, 3)
    out = chunked_topk_logprobs(hidden, weight, 4, chunk_size=4)
    assert out.gathered_logprobs is None
    _, vals, _ = _naive(hidden, weight, None, 4, gather)
    (g,) = torch.autograd.grad(out.topk_logprobs.sum(), hidden)
    (g_ref,) = torch.autograd.grad(vals.sum(), hidden)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    # k = 0: only the gathered log-probs (the teacher-context branch needs no student top-K)
    out0 = chunked_topk_logprobs(hidden, weight, 0, gather, chunk_size=4)
    assert out0.topk_ids.shape == (9, 0) and out0.gathered_logprobs is not None
    _, _, gathered = _naive(hidden, weight, None, 1, gather)
    gsum = out0.gathered_logprobs.masked_fill(gather < 0, 0).sum()
    (g0,) = torch.autograd.grad(gsum, hidden)
    (g0_ref,) = torch.autograd.grad(gathered.masked_fill(gather < 0, 0).sum(), hidden)
    torch.testing.assert_close(g0, g0_ref, atol=1e-5, rtol=1e-5)


def test_no_grad_and_ids_carry_no_gradient() -> None:
    hidden, weight, _, gather = _inputs(5, (6,), 8, 20, 2)
    out = chunked_topk_logprobs(hidden, weight, 3, gather)
    assert not out.topk_ids.requires_grad and out.topk_logprobs.requires_grad
    with torch.no_grad():
        out = chunked_topk_logprobs(hidden, weight, 3, gather)
    assert out.topk_logprobs.grad_fn is None


@pytest.mark.parametrize("upcast", [True, False])
def test_bf16(upcast: bool) -> None:
    k, k2, h, v = 5, 4, 32, 120
    hidden, weight, bias, gather = _inputs(6, (2, 13), h, v, k2, dtype=torch.bfloat16)
    out = chunked_topk_logprobs(hidden, weight, k, gather, chunk_size=5, bias=bias, upcast_matmul=upcast)
    assert out.topk_logprobs.dtype == torch.float32 and out.gathered_logprobs is not None
    if upcast:  # exactly the fp32 computation on the bf16 values
        ref_logits = hidden.float() @ weight.float().t() + bias.float()
    else:  # a stock bf16 lm_head, upcast before log-softmax
        ref_logits = (hidden @ weight.t()).float() + bias.float()
    ref_lp = torch.log_softmax(ref_logits, -1)
    ref_vals = ref_lp.gather(-1, out.topk_ids)
    torch.testing.assert_close(out.topk_logprobs, ref_vals, atol=1e-5 if upcast else 2e-2, rtol=0)
    assert (out.topk_logprobs[..., :-1] >= out.topk_logprobs[..., 1:]).all()
    sc, tc, mask = _teacher(7, (2, 13, k), gather)
    grads = torch.autograd.grad(
        _dual_loss(out.topk_logprobs, out.gathered_logprobs, sc, tc, mask), (hidden, weight, bias)
    )
    ref_gathered = ref_lp.gather(-1, gather.clamp_min(0)).masked_fill(gather < 0, float("-inf"))
    ref_grads = torch.autograd.grad(_dual_loss(ref_vals, ref_gathered, sc, tc, mask), (hidden, weight, bias))
    for got, ref, inp in zip(grads, ref_grads, (hidden, weight, bias), strict=True):
        assert got.dtype == inp.dtype == torch.bfloat16
        err = (got.float() - ref.float()).abs().max() / ref.float().abs().max()
        assert err < 3e-2


def test_argument_errors() -> None:
    hidden, weight, _, gather = _inputs(8, (4,), 8, 20, 2)
    with pytest.raises(ValueError, match="lm_head_weight"):
        chunked_topk_logprobs(hidden, weight[:, :4], 2)
    with pytest.raises(ValueError, match="gather_ids"):
        chunked_topk_logprobs(hidden, weight, 2, gather[:3])
    with pytest.raises(ValueError, match="gather_ids"):
        chunked_topk_logprobs(hidden, weight, 2, gather + 20)
    with pytest.raises(ValueError, match="k must"):
        chunked_topk_logprobs(hidden, weight, 21)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_topk_logprobs(hidden, weight, 2, chunk_size=0)


# ---------------------------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------------------------


class _MemoryTracker(TorchDispatchMode):
    """Records, over every aten op run inside it (forward and backward), the largest tensor and
    the peak of live bytes: storages produced by ops, tracked by weak reference until freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak_bytes = 0
        self.max_numel = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
                storage = t.untyped_storage()
                old = self.live.get(storage.data_ptr())
                if old is None or old[0].expired():
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {p: e for p, e in self.live.items() if not e[0].expired()}
        self.peak_bytes = max(self.peak_bytes, sum(n for _, n in self.live.values()))
        return out


def _track(fn: Callable[[], None]) -> _MemoryTracker:
    tracker = _MemoryTracker()
    with tracker:
        fn()
    return tracker


def test_peak_memory_stays_near_one_chunk_on_a_large_vocabulary() -> None:
    t, h, v, k, chunk = 96, 8, 151_936, 16, 16
    hidden, weight, _, gather = _inputs(9, (t,), h, v, k)
    sc, tc, mask = _teacher(10, (t, k), gather)

    def chunked() -> None:
        out = chunked_topk_logprobs(hidden, weight, k, gather, chunk_size=chunk)
        _dual_loss(out.topk_logprobs, out.gathered_logprobs, sc, tc, mask).backward()

    def naive() -> None:
        _, vals, gathered = _naive(hidden, weight, None, k, gather)
        _dual_loss(vals, gathered, sc, tc, mask).backward()

    chunk_bytes, full_bytes, w_bytes = chunk * v * 4, t * v * 4, v * h * 4
    mem_chunked, mem_naive = _track(chunked), _track(naive)
    # the tracker sees the naive path's [T, V] logits, so it could see ours
    assert mem_naive.max_numel >= t * v
    assert mem_naive.peak_bytes >= 2 * full_bytes
    # ours: never a tensor above one chunk of logits (grad_W is [V, H] with H < chunk), and the
    # live total stays at one chunk plus the W-sized buffers (W as seen through views, grad_W)
    assert mem_chunked.max_numel <= max(chunk * v, v * h)
    assert mem_chunked.peak_bytes <= chunk_bytes + 2 * w_bytes + 1_000_000
    assert mem_chunked.peak_bytes * 8 < mem_naive.peak_bytes
