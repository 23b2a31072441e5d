"""The tail-aware losses (issue #24) against brute-force float64 references: the (K+1)-bucket KLs of the
trainer/losses.py docstring, their closed-form gradients, and autograd of the exact KL where the tails are well
above the floor (the score-function coefficients ARE the KL's gradient there)."""

from __future__ import annotations

import math

import pytest
import torch

from brts.trainer.losses import TAIL_FLOOR, student_context_loss, teacher_context_loss, topk_masses

NEG_INF = float("-inf")
ATOL = 1e-9


def _case(seed: int, vocab: int = 50, k: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs [3, 7, K] of two random distributions over ``vocab`` (so each top-K holds part of the mass),
    a random mask and some -inf padding."""
    g = torch.Generator().manual_seed(seed)
    a = torch.log_softmax(torch.randn(3, 7, vocab, generator=g, dtype=torch.float64) * 2, -1)[..., :k].clone()
    b = torch.log_softmax(torch.randn(3, 7, vocab, generator=g, dtype=torch.float64) * 2, -1)[..., :k].clone()
    mask = torch.rand(3, 7, generator=g) < 0.7
    b[torch.rand(3, 7, k, generator=g) < 0.15] = NEG_INF
    a[torch.rand(3, 7, k, generator=g) < 0.1] = NEG_INF
    return a, b, mask


def _rows(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor):
    """(flat index, kept entries, student row, teacher row) of every masked-in position."""
    a2, b2, m2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), mask.reshape(-1)
    for t in range(a2.shape[0]):
        if m2[t]:
            ar, br = a2[t].tolist(), b2[t].tolist()
            yield t, [k for k in range(len(ar)) if math.isfinite(br[k]) and ar[k] != NEG_INF], ar, br


def _tail(logprobs: list[float], keep: list[int]) -> float:
    return max(1.0 - sum(math.exp(logprobs[k]) for k in keep), TAIL_FLOOR)


def _brute_sc_tail(a, b, mask, n):
    """Σ [Σ_k p_k (a_k − b_k) + p_T (log p_T − log q_T)] / N and the gradient p_k (a_k − b_k − r) / N."""
    value, grad = 0.0, torch.zeros(a.reshape(-1, a.shape[-1]).shape, dtype=torch.float64)
    for t, keep, ar, br in _rows(a, b, mask):
        pt, qt = _tail(ar, keep), _tail(br, keep)
        r = math.log(pt) - math.log(qt)
        value += (sum(math.exp(ar[k]) * (ar[k] - br[k]) for k in keep) + pt * r) / n
        for k in keep:
            grad[t, k] = math.exp(ar[k]) * (ar[k] - br[k] - r) / n
    return value, grad.reshape(a.shape)


def _brute_tc_tail(ell, c, mask, n):
    """Σ [Σ_k q_k (c_k − ℓ_k) + q_T (log q_T − log p_T)] / N and the gradient (−q_k + q_T p_k / p_T) / N."""
    value, grad = 0.0, torch.zeros(ell.reshape(-1, ell.shape[-1]).shape, dtype=torch.float64)
    for t, keep, lr, cr in _rows(ell, c, mask):
        pt, qt = _tail(lr, keep), _tail(cr, keep)
        value += (sum(math.exp(cr[k]) * (cr[k] - lr[k]) for k in keep) + qt * (math.log(qt) - math.log(pt))) / n
        for k in keep:
            grad[t, k] = (-math.exp(cr[k]) + qt * math.exp(lr[k]) / pt) / n
    return value, grad.reshape(ell.shape)


def _value_and_grad(fn, x, other, mask, **kw):
    x = x.clone().requires_grad_(True)
    loss = fn(x, other, mask, tail=True, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_student_context_tail_matches_brute_force(seed):
    a, b, mask = _case(seed)
    value, grad = _value_and_grad(student_context_loss, a, b, mask)
    ref_value, ref_grad = _brute_sc_tail(a, b, mask, float(mask.sum()))
    assert value.item() == pytest.approx(ref_value, abs=ATOL)
    torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=0)
    assert value.item() != pytest.approx(student_context_loss(a, b, mask).item(), abs=1e-6)  # the tail changes it


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_teacher_context_tail_matches_brute_force(seed):
    ell, c, mask = _case(seed + 10)
    value, grad = _value_and_grad(teacher_context_loss, ell, c, mask)
    ref_value, ref_grad = _brute_tc_tail(ell, c, mask, float(mask.sum()))
    assert value.item() == pytest.approx(ref_value, abs=ATOL)
    torch.testing.assert_close(grad, ref_grad, atol=ATOL, rtol=0)


def _exact_kls(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse KL(p_x || p_y) and forward KL(p_y || p_x) over K + 1 buckets, differentiable in x, no floor."""
    px, py = x.exp(), y.exp()
    tx, ty = 1 - px.sum(-1), 1 - py.sum(-1)
    reverse = (px * (x - y)).sum(-1) + tx * (tx.log() - ty.log())
    forward = (py * (y - x)).sum(-1) + ty * (ty.log() - tx.log())
    return reverse.sum(), forward.sum()


def test_the_score_function_coefficients_are_the_kls_gradients():
    """With every tail well above the floor, the surrogates' gradients equal autograd of the exact KLs."""
    g = torch.Generator().manual_seed(5)
    x = torch.log_softmax(torch.randn(4, 6, 40, generator=g, dtype=torch.float64), -1)[..., :6].clone()
    y = torch.log_softmax(torch.randn(4, 6, 40, generator=g, dtype=torch.float64), -1)[..., :6].clone()
    mask = torch.ones(4, 6, dtype=torch.bool)
    x_req = x.clone().requires_grad_(True)
    reverse, forward = _exact_kls(x_req, y)
    g_rev, g_fwd = (torch.autograd.grad(kl / 24, x_req, retain_graph=True)[0] for kl in (reverse, forward))
    sc_value, sc_grad = _value_and_grad(student_context_loss, x, y, mask)
    tc_value, tc_grad = _value_and_grad(teacher_context_loss, x, y, mask)
    assert sc_value.item() == pytest.approx(reverse.item() / 24, abs=ATOL)
    assert tc_value.item() == pytest.approx(forward.item() / 24, abs=ATOL)
    torch.testing.assert_close(sc_grad, g_rev, atol=ATOL, rtol=0)
    torch.testing.assert_close(tc_grad, g_fwd, atol=ATOL, rtol=0)


def test_padded_ids_put_their_mass_in_the_tail():
    """A teacher id the student has no logit for arrives as padding (-1 → -inf on both sides, issue #23's guard):
    with the tail on, its teacher mass is in q_T, exactly as if the bucket had been merged into the tail."""
    c = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.1), math.log(0.05)]], dtype=torch.float64)
    ell = torch.tensor([[math.log(0.3), math.log(0.3), math.log(0.1), math.log(0.2)]], dtype=torch.float64)
    mask = torch.ones(1, dtype=torch.bool)
    padded_c, padded_ell = c.clone(), ell.clone()
    padded_c[0, 3], padded_ell[0, 3] = NEG_INF, NEG_INF
    value = teacher_context_loss(padded_ell, padded_c, mask, tail=True).item()
    q_tail, p_tail = 1 - 0.8, 1 - 0.7  # 0.05 of the teacher's (and 0.2 of the student's) mass moved to the tails
    expected = sum(q * (math.log(q) - math.log(p)) for q, p in ((0.5, 0.3), (0.2, 0.3), (0.1, 0.1)))
    expected += q_tail * (math.log(q_tail) - math.log(p_tail))
    assert value == pytest.approx(expected, abs=1e-12)
    assert value != pytest.approx(teacher_context_loss(padded_ell, padded_c, mask).item(), abs=1e-6)


def test_a_tail_at_or_near_zero_gives_no_nan_or_inf():
    """Both top-Ks holding all the mass (1 − Σ p rounds to 0 or below) and a student that has put everything on
    the teacher's set while the teacher has not: finite values, finite gradients."""
    full = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.5, -1.0]], dtype=torch.float32), -1)
    other = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0, 0.0]], dtype=torch.float32), -1)
    partial = other + math.log(0.5)  # the teacher keeps half its mass outside the set
    mask = torch.ones(1, dtype=torch.bool)
    for fn in (student_context_loss, teacher_context_loss):
        for x, y in ((full, other), (full, partial), (full, full), (partial, full)):
            value, grad = _value_and_grad(fn, x, y, mask)
            assert torch.isfinite(value) and torch.isfinite(grad).all(), (fn.__name__, x, y)
    value, grad = _value_and_grad(student_context_loss, full, full, mask)
    assert value.item() == pytest.approx(0.0, abs=1e-6) and grad.abs().max() < 1e-5  # same distribution: KL 0


def test_topk_masses_sum_the_kept_entries():
    a, b, mask = _case(3)
    student, teacher = topk_masses(a, b, mask)
    ref_s = sum(sum(math.exp(ar[k]) for k in keep) for _, keep, ar, _ in _rows(a, b, mask))
    ref_t = sum(sum(math.exp(br[k]) for k in keep) for _, keep, _, br in _rows(a, b, mask))
    assert student.item() == pytest.approx(ref_s, abs=1e-12) and teacher.item() == pytest.approx(ref_t, abs=1e-12)
