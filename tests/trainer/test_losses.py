"""The dual-branch loss against brute-force float64 references (values and closed-form gradients)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from brts.trainer.losses import (
    DualBranchLoss,
    LossConfig,
    dual_branch_loss,
    student_context_loss,
    teacher_context_loss,
)

NEG_INF = float("-inf")
LossFn = Callable[..., torch.Tensor]
ATOL = 1e-9  # float64 throughout; the issue asks for 1e-6


def _random_case(
    seed: int, shape: tuple[int, ...] = (3, 7), k: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student/teacher log-probs [..., K] (float64), a random mask, and some -inf padded entries."""
    g = torch.Generator().manual_seed(seed)
    a = torch.log_softmax(torch.randn(*shape, 50, generator=g, dtype=torch.float64), -1)[..., :k].clone()
    b = torch.log_softmax(torch.randn(*shape, 50, generator=g, dtype=torch.float64), -1)[..., :k].clone()
    mask = torch.rand(shape, generator=g) < 0.7
    pad_teacher = torch.rand(*shape, k, generator=g) < 0.15
    pad_student = torch.rand(*shape, k, generator=g) < 0.1
    b[pad_teacher] = NEG_INF
    a[pad_student] = NEG_INF
    return a, b, mask


def _kept(a_row: list[float], b_row: list[float]) -> list[int]:
    return [k for k in range(len(a_row)) if math.isfinite(b_row[k]) and a_row[k] != NEG_INF]


def _brute_sc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, n: float) -> tuple[float, torch.Tensor]:
    """Σ_masked Σ_k w_k (a_k − b_k) / N and the closed-form gradient w_k (a_k − b_k) / N (§8.1)."""
    a2, b2, m2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), mask.reshape(-1)
    value = 0.0
    grad = torch.zeros_like(a2)
    for t in range(a2.shape[0]):
        if not m2[t]:
            continue
        ar, br = a2[t].tolist(), b2[t].tolist()
        keep = _kept(ar, br)
        if not keep:
            continue
        z = sum(math.exp(ar[k]) for k in keep)
        for k in keep:
            w = math.exp(ar[k]) / z
            value += w * (ar[k] - br[k]) / n
            grad[t, k] = w * (ar[k] - br[k]) / n
    return value, grad.reshape(a.shape)


def _brute_tc(ell: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, n: float) -> tuple[float, torch.Tensor]:
    """Σ_masked Σ_k π_k (c_k − ℓ_k) / N and the gradient −π_k / N (§8.3 teacher_topk)."""
    l2, c2, m2 = ell.reshape(-1, ell.shape[-1]), c.reshape(-1, c.shape[-1]), mask.reshape(-1)
    value = 0.0
    grad = torch.zeros_like(l2)
    for t in range(l2.shape[0]):
        if not m2[t]:
            continue
        lr, cr = l2[t].tolist(), c2[t].tolist()
        keep = _kept(lr, cr)
        if not keep:
            continue
        z = sum(math.exp(cr[k]) for k in keep)
        for k in keep:
            pi = math.exp(cr[k]) / z
            value += pi * (cr[k] - lr[k]) / n
            grad[t, k] = -pi / n
    return value, grad.reshape(ell.shape)


def _value_and_grad(
    fn: LossFn, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, **kw: object
) -> tuple[torch.Tensor, torch.Tensor]:
    a = a.clone().requires_grad_(True)
    loss = fn(a, b, mask, **kw)
    (grad,) = torch.autograd.grad(loss, a)
    return loss.detach(), grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_student_context_matches_brute_force(seed: int) -> None:
    a, b, mask = _random_case(seed)
    assert mask.any() and torch.isinf(b).any() and torch.isinf(a).any()  # the case exercises padding
    value, grad = _value_and_grad(student_context_loss, a, b, mask)
    ref_value, ref_grad = _brute_sc(a, b, mask, float(mask.sum()))
    assert value.item() == pytest.approx(ref_value, abs=ATOL)
    torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=0)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_teacher_context_matches_brute_force(seed: int) -> None:
    ell, c, mask = _random_case(seed + 10)
    value, grad = _value_and_grad(teacher_context_loss, ell, c, mask)
    ref_value, ref_grad = _brute_tc(ell, c, mask, float(mask.sum()))
    assert value.item() == pytest.approx(ref_value, abs=ATOL)
    torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=0)
    assert torch.isfinite(grad).all()


def test_student_context_gradient_is_not_autograd_of_the_value() -> None:
    """The reference's aux bug (§8.3): differentiating D with w detached gives w/N, teacher-free."""
    a, b, mask = _random_case(3)
    mask[:] = True
    a, b = a.clamp_min(-30), b.clamp_min(-30)  # no padding: compare dense closed forms
    _, grad = _value_and_grad(student_context_loss, a, b, mask)
    w = torch.softmax(a, -1)
    n = mask.sum().item()
    buggy = w / n  # d/da of Σ sg(w)(a − b) / N
    intended = w * (a - b) / n
    torch.testing.assert_close(grad, intended, atol=ATOL, rtol=0)
    assert (grad - buggy).abs().max() > 1e-3
    # and the gradient depends on the teacher
    _, grad_other_teacher = _value_and_grad(
        student_context_loss, a, b - 1.0 * torch.arange(5.0, dtype=torch.float64), mask
    )
    assert (grad - grad_other_teacher).abs().max() > 1e-3


def test_student_context_zero_when_teacher_equals_student() -> None:
    a, _, mask = _random_case(4)
    a = a.clamp_min(-30)
    value, grad = _value_and_grad(student_context_loss, a, a.clone(), mask)
    assert value.item() == 0.0
    assert grad.abs().max().item() == 0.0


@pytest.mark.parametrize("fn", [student_context_loss, teacher_context_loss])
def test_masked_positions_contribute_nothing(fn: LossFn) -> None:
    a, b, mask = _random_case(5)
    value, grad = _value_and_grad(fn, a, b, mask)
    # garbage (NaN, inf, huge) at masked-out positions changes nothing, and gets zero gradient
    a2, b2 = a.clone(), b.clone()
    a2[~mask] = float("nan")
    b2[~mask] = float("inf")
    value2, grad2 = _value_and_grad(fn, a2, b2, mask)
    assert value2.item() == value.item()
    assert torch.equal(grad2, grad)
    assert (grad2[~mask] == 0).all()


@pytest.mark.parametrize("fn", [student_context_loss, teacher_context_loss])
def test_padded_entries_are_dropped_and_weights_renormalised(fn: LossFn) -> None:
    """Padding an entry with -inf teacher log-prob equals removing that entry from K altogether."""
    g = torch.Generator().manual_seed(6)
    a = torch.log_softmax(torch.randn(4, 6, 40, generator=g, dtype=torch.float64), -1)[..., :6].clone()
    b = torch.log_softmax(torch.randn(4, 6, 40, generator=g, dtype=torch.float64), -1)[..., :6].clone()
    mask = torch.ones(4, 6, dtype=torch.bool)
    b_pad = b.clone()
    b_pad[..., 4:] = NEG_INF  # pad the last two entries of every position
    a_pad = a.clone()
    a_pad[..., 5] = 123.0  # a wild student value at a padded entry must not matter
    value_pad, grad_pad = _value_and_grad(fn, a_pad, b_pad, mask)
    value_cut, grad_cut = _value_and_grad(fn, a[..., :4].contiguous(), b[..., :4].contiguous(), mask)
    assert value_pad.item() == pytest.approx(value_cut.item(), abs=ATOL)
    torch.testing.assert_close(grad_pad[..., :4], grad_cut, atol=ATOL, rtol=0)
    assert (grad_pad[..., 4:] == 0).all()
    # a student -inf (gathered id -1) is dropped the same way
    a_inf = a.clone()
    a_inf[..., 4:] = NEG_INF
    value_inf, grad_inf = _value_and_grad(fn, a_inf, b, mask)
    assert value_inf.item() == pytest.approx(value_cut.item(), abs=ATOL)
    assert (grad_inf[..., 4:] == 0).all() and torch.isfinite(grad_inf).all()


@pytest.mark.parametrize("fn", [student_context_loss, teacher_context_loss])
def test_all_entries_padded_at_a_position_contributes_nothing(fn: LossFn) -> None:
    a, b, mask = _random_case(7)
    mask[0, 0] = True
    value, grad = _value_and_grad(fn, a, b, mask)
    b2 = b.clone()
    b2[0, 0] = NEG_INF
    value2, grad2 = _value_and_grad(fn, a, b2, mask, num_tokens=mask.sum())
    ref_value, _ = (_brute_sc if fn is student_context_loss else _brute_tc)(a, b2, mask, float(mask.sum()))
    assert math.isfinite(value2.item()) and value2.item() == pytest.approx(ref_value, abs=ATOL)
    assert (grad2[0, 0] == 0).all() and torch.isfinite(grad2).all()
    assert value2.item() != value.item()


@pytest.mark.parametrize("fn", [student_context_loss, teacher_context_loss])
@pytest.mark.parametrize("num_tokens", [None, 0, 0.0, "tensor"])
def test_empty_mask_gives_zero_with_a_working_backward(fn: LossFn, num_tokens: object) -> None:
    a, b, mask = _random_case(8)
    mask[:] = False
    n = torch.tensor(0) if num_tokens == "tensor" else num_tokens
    a = a.clone().requires_grad_(True)
    loss = fn(a, b, mask, num_tokens=n)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert loss.grad_fn is not None
    loss.backward()
    assert a.grad is not None and (a.grad == 0).all()


@pytest.mark.parametrize("fn", [student_context_loss, teacher_context_loss])
def test_num_tokens_scales_exactly(fn: LossFn) -> None:
    a, b, mask = _random_case(9)
    local = int(mask.sum())
    value_default, grad_default = _value_and_grad(fn, a, b, mask)
    for n in (local, float(local), torch.tensor(local), torch.tensor(float(local))):
        value, grad = _value_and_grad(fn, a, b, mask, num_tokens=n)
        assert value.item() == value_default.item()
        assert torch.equal(grad, grad_default)
    # the all-reduced count of the whole step: everything scales by local / global
    value, grad = _value_and_grad(fn, a, b, mask, num_tokens=4 * local)
    assert value.item() == pytest.approx(value_default.item() / 4, rel=1e-12)
    torch.testing.assert_close(grad, grad_default / 4, atol=1e-15, rtol=1e-12)


def test_num_tokens_zero_with_nonempty_mask_is_zero_not_nan() -> None:
    a, b, mask = _random_case(10)
    value, grad = _value_and_grad(student_context_loss, a, b, mask, num_tokens=0)
    assert value.item() == 0.0 and (grad == 0).all()


def test_nan_student_logprob_at_a_kept_entry_surfaces() -> None:
    a, b, mask = _random_case(11)
    mask[1, 1] = True
    b[1, 1, 0] = -1.0
    a[1, 1, 0] = float("nan")
    assert torch.isnan(student_context_loss(a, b, mask))
    assert torch.isnan(teacher_context_loss(a, b, mask))


def test_bf16_inputs_compute_in_fp32() -> None:
    a, b, mask = _random_case(12)
    loss64 = student_context_loss(a, b, mask)
    loss_bf16 = student_context_loss(a.to(torch.bfloat16), b.to(torch.bfloat16), mask)
    assert loss_bf16.dtype == torch.float32
    assert loss_bf16.item() == pytest.approx(loss64.item(), abs=0.05)


def test_shape_errors_name_the_argument() -> None:
    a, b, mask = _random_case(13)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        student_context_loss(a, b[..., :3], mask)
    with pytest.raises(ValueError, match="mask"):
        teacher_context_loss(a, b, mask[:, :3])
    with pytest.raises(ValueError, match="mask"):
        student_context_loss(a, b, mask.long())
    with pytest.raises(ValueError, match="num_tokens"):
        student_context_loss(a, b, mask, num_tokens=-1)
    with pytest.raises(ValueError, match="num_tokens"):
        student_context_loss(a, b, mask, num_tokens=torch.ones(2))


def test_dual_branch_total_is_sc_plus_lambda_tc() -> None:
    a, b, m = _random_case(14)
    ell, c, m2 = _random_case(15, shape=(2, 9), k=4)
    a, ell = a.clone().requires_grad_(True), ell.clone().requires_grad_(True)
    out = dual_branch_loss(a, b, m, ell, c, m2, lam=0.05, sc_num_tokens=100, tc_num_tokens=50)
    assert isinstance(out, DualBranchLoss)
    sc = student_context_loss(a, b, m, num_tokens=100)
    tc = teacher_context_loss(ell, c, m2, num_tokens=50)
    assert out.student_context.item() == sc.item() and out.teacher_context.item() == tc.item()
    assert out.total.item() == pytest.approx(sc.item() + 0.05 * tc.item(), abs=1e-15)
    out.total.backward()
    _, ref_grad_tc = _brute_tc(ell.detach(), c, m2, 50.0)
    torch.testing.assert_close(ell.grad, 0.05 * ref_grad_tc, atol=ATOL, rtol=0)
    _, ref_grad_sc = _brute_sc(a.detach(), b, m, 100.0)
    torch.testing.assert_close(a.grad, ref_grad_sc, atol=ATOL, rtol=0)


def test_dual_branch_without_teacher_branch() -> None:
    a, b, m = _random_case(16)
    out = dual_branch_loss(a, b, m)
    assert out.teacher_context.item() == 0.0
    assert out.total.item() == out.student_context.item()
    with pytest.raises(ValueError, match="together"):
        dual_branch_loss(a, b, m, tc_student_logprobs=a)
    with pytest.raises(ValueError, match="lam"):
        dual_branch_loss(a, b, m, lam=-1.0)


def test_loss_config_default_and_validation() -> None:
    assert LossConfig().lam == 1.0
    assert LossConfig(lam=0.05).lam == 0.05
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam"):
            LossConfig(lam=bad)
