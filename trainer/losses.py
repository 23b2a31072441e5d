"""The BRTS dual-branch loss on gathered top-K log-probs: L = L_SC + λ·L_TC.

Pure functions, no I/O. Inputs are per-position top-K log-probs (full-vocabulary normalised, T=1),
as produced by `brts.trainer.topk_logprobs` for the student and served by the teacher server.

Student-context branch (main), brts-reference §8.1
--------------------------------------------------
On the student's rollout y, at each position t, with the student's top-K ids S_t:
a_k = log p_θ(S_t(k)) (with grad), b_k = log q(S_t(k)) (teacher), w = softmax_K(a), detached.
The reference trains a REINFORCE-style surrogate whose gradient is Σ_k w_k (a_k − b_k) ∇a_k
(token-mean over the batch). We return a value with that exact gradient *and* a meaningful value:

    L_SC = Σ_{masked t} [ D_t + Σ_k sg(w_k (a_k − b_k)) · (a_k − sg(a_k)) ] / N,
    D_t  = Σ_k w_k (a_k − b_k)   (detached)

Its value is the top-K reverse-KL estimate D (the second term is 0 in value); its gradient w.r.t.
a_k is w_k (a_k − b_k) / N. Differentiating D itself (with w detached) would give w_k / N, which
does not depend on the teacher at all: that is the reference's aux-loss bug (§8.3, `student_p`).

Teacher-context branch (aux), brts-reference §8.3 `teacher_topk`
----------------------------------------------------------------
On the selected teacher trajectory z, with the teacher's own top-K ids T_t:
c_k = log q(T_t(k)), ℓ_k = log p_θ(T_t(k)) (with grad), π = softmax_K(c):

    L_TC = Σ_{masked t} Σ_k π_k (c_k − ℓ_k) / N,   ∂L_TC/∂ℓ_k = −π_k / N

i.e. the forward KL (soft cross-entropy) to the teacher renormalised over its top-K.

Padding (our choice, documented here once)
------------------------------------------
Top-K arrays are padded with id -1 and log-prob -inf (design.md §3). An entry (t, k) counts only if
its teacher log-prob is finite and its student log-prob is not -inf (a gathered id of -1 gives
-inf, see `brts.trainer.topk_logprobs`). A NaN student log-prob is not dropped: it is a bug upstream
and must surface. Dropped entries are removed from the weights'
softmax (w and π are renormalised over the finite entries only) and from the sum, and receive
exactly zero gradient (never NaN). A position with no finite entry contributes nothing.

Tail buckets (options ``sc_tail``, ``tc_tail``; off by default)
-------------------------------------------------------------
Renormalising over the K entries ignores how much mass each side puts OUTSIDE the set, so a student can shrink
its own top-K mass without the loss noticing (verl's maintainers called plain top-K reverse KL unstable for it).
With a tail, each side's distribution is its full-vocabulary probabilities on the kept entries plus a (K+1)-th
bucket holding the rest: p_k = exp(a_k), p_T = 1 − Σ_k p_k (q likewise). Entries dropped as padding (including
teacher ids beyond the student's vocabulary, turned into padding upstream) are simply not kept, so their mass
lands in both tails. A tail below ``TAIL_FLOOR`` counts as ``TAIL_FLOOR`` (computed in float64 from
logsumexp, 1 − Σ rounds to ~1e-7 in fp32 anyway): no log 0, no division by 0.

L_SC with a tail, the reverse KL over K+1 buckets, per position:

    D = Σ_k p_k (a_k − b_k) + p_T (log p_T − log q_T).

Since ∂p_T/∂a_k = −p_k and Σ_k p_k + p_T = 1, ∂D/∂a_k = p_k (a_k − b_k) + p_k − p_k r − p_k = p_k (a_k − b_k − r),
r = log p_T − log q_T. This is also the score-function form: ∇D = Σ_buckets p_i (log p_i − log q_i) ∇ log p_i, the
tail's ∇ log p_T being −Σ_k p_k ∇a_k / p_T. So the surrogate keeps its shape, with new coefficients:

    L_SC = Σ_{masked t} [ D_t + Σ_k sg(p_k (a_k − b_k − r)) · (a_k − sg(a_k)) ] / N.

L_TC with a tail, the forward KL over the teacher's K+1 buckets, per position:

    F = Σ_k q_k (c_k − ℓ_k) + q_T (log q_T − log p_T),   ∂F/∂ℓ_k = −q_k + q_T p_k / p_T,

and L_TC = Σ_{masked t} [ F_t + Σ_k sg(∂F/∂ℓ_k) · (ℓ_k − sg(ℓ_k)) ] / N (p_T floored in both the value and the
gradient, so the gradient stays finite when the student has put all its mass on the teacher's set).

Normaliser N
------------
`num_tokens` defaults to ``mask.sum()`` (token-mean over this call's tokens, the reference's
`token-mean`, §8.2). The trainer passes the all-reduced valid-token count of the whole step instead,
so micro-batches and ranks add up to an exact global token mean (the reference does not, §8.2).
N == 0 returns a zero that is still connected to the inputs' graph, so ``backward()`` works and
gives zero gradients; the check is done with tensor ops (no host sync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "DualBranchLoss",
    "LossConfig",
    "dual_branch_loss",
    "student_context_loss",
    "teacher_context_loss",
    "topk_masses",
    "TAIL_FLOOR",
]

NumTokens = int | float | torch.Tensor | None

#: The smallest tail mass a tail bucket takes (see "Tail buckets" above).
TAIL_FLOOR = 1e-6


@dataclass(frozen=True)
class LossConfig:
    """λ, the weight of the teacher-context branch. Default 1.0: the paper's value is unresolved
    (brts-reference §8.4: README 0.05, the authors' run registry says coef=1)."""

    lam: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.lam, int | float) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")


class DualBranchLoss(NamedTuple):
    """The total L = L_SC + λ·L_TC and its two (unweighted) parts, all 0-d tensors."""

    total: torch.Tensor
    student_context: torch.Tensor
    teacher_context: torch.Tensor


def _check_shapes(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, mask: torch.Tensor) -> None:
    if a.dim() < 1:
        raise ValueError(f"{name_a} must be [..., K], got a scalar")
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")
    if mask.shape != a.shape[:-1]:
        raise ValueError(f"mask must have shape {tuple(a.shape[:-1])} (= {name_a} without K), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """At least float32 (bf16 inputs are upcast), float64 stays float64."""
    return torch.promote_types(t.dtype, torch.float32)


def _valid_entries(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bool [..., K]: a masked-in position, a finite teacher log-prob, a student log-prob != -inf.

    A NaN student log-prob is kept on purpose: it is an upstream bug and must show in the loss.
    """
    return mask.unsqueeze(-1) & torch.isfinite(teacher) & ~torch.isneginf(student)


def _masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim restricted to `keep`; all-zero rows where nothing is kept."""
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    z = torch.where(keep, logits, neg_inf)
    row_max = z.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.where(keep, torch.exp(z - row_max), torch.zeros_like(z))
    s = e.sum(dim=-1, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def _tail_logmass(logprobs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log max(1 − Σ_kept exp(x), TAIL_FLOOR) per position, in float64; 0 (a tail of 1) where nothing is kept."""
    x = torch.where(keep, logprobs.detach().double(), torch.tensor(float("-inf"), dtype=torch.float64,
                                                                   device=logprobs.device))
    tail = -torch.expm1(torch.logsumexp(x, dim=-1))
    return torch.log(tail.clamp_min(TAIL_FLOOR))


def _kept_probs(logprobs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """exp(x) at kept entries, 0 elsewhere, float64, detached."""
    return torch.where(keep, torch.exp(torch.where(keep, logprobs.detach().double(), 0.0)), 0.0)


def _with_tail_sc(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D per position, sg coefficient of a_k) of L_SC with a tail bucket (module docstring), float64."""
    p = _kept_probs(a, keep)
    log_pt, log_qt = _tail_logmass(a, keep), _tail_logmass(b, keep)
    r = log_pt - log_qt
    diff = torch.where(keep, a.detach().double() - b.double(), 0.0)
    value = (p * diff).sum(dim=-1) + torch.exp(log_pt) * r
    return value, p * (diff - r.unsqueeze(-1))


def _with_tail_tc(ell: torch.Tensor, c: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F per position, sg coefficient of ℓ_k) of L_TC with a tail bucket (module docstring), float64."""
    q, p = _kept_probs(c, keep), _kept_probs(ell, keep)
    log_qt, log_pt = _tail_logmass(c, keep), _tail_logmass(ell, keep)
    diff = torch.where(keep, c.double() - ell.detach().double(), 0.0)
    q_tail = torch.exp(log_qt)
    value = (q * diff).sum(dim=-1) + q_tail * (log_qt - log_pt)
    return value, -q + (q_tail / torch.exp(log_pt)).unsqueeze(-1) * p


def topk_masses(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over masked positions of the student's and of the teacher's probability mass on the kept entries (the
    entries a branch's loss uses), float64, detached: divided by the token count, the per-token top-K masses."""
    _check_shapes("student_logprobs", student_logprobs, "teacher_logprobs", teacher_logprobs, mask)
    keep = _valid_entries(student_logprobs, teacher_logprobs, mask)
    return _kept_probs(student_logprobs, keep).sum(), _kept_probs(teacher_logprobs, keep).sum()


def _normalise(total: torch.Tensor, mask: torch.Tensor, num_tokens: NumTokens) -> torch.Tensor:
    """total / N, and an exact, graph-connected 0 when N == 0 (no NaN, no host sync)."""
    if num_tokens is None:
        n = mask.sum().to(total.dtype)
    elif isinstance(num_tokens, torch.Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(f"num_tokens must be a scalar, got shape {tuple(num_tokens.shape)}")
        n = num_tokens.detach().reshape(()).to(device=total.device, dtype=total.dtype)
    elif isinstance(num_tokens, int | float) and not isinstance(num_tokens, bool):
        if not math.isfinite(num_tokens) or num_tokens < 0:
            raise ValueError(f"num_tokens must be a finite number >= 0, got {num_tokens!r}")
        n = torch.tensor(float(num_tokens), dtype=total.dtype, device=total.device)
    else:
        raise ValueError(f"num_tokens must be None, an int, a float or a 0-d tensor, got {type(num_tokens).__name__}")
    nonzero = n != 0
    safe_n = torch.where(nonzero, n, torch.ones_like(n))
    return total / safe_n * nonzero.to(total.dtype)


def student_context_loss(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: NumTokens = None,
    tail: bool = False,
) -> torch.Tensor:
    """Top-K reverse KL on the student's rollout, in score-function form (brts-reference §8.1).

    `student_logprobs` a [..., K] (with grad): full-vocabulary log p_θ at the student's top-K ids;
    `teacher_logprobs` b [..., K]: log q at the same ids; `mask` [...] bool; `num_tokens` N.
    Value: Σ_masked D / N with D = Σ_k w_k (a_k − b_k), w = softmax_K(a) detached. Gradient w.r.t.
    a_k: w_k (a_k − b_k) / N (not w_k / N, which autograd of the value would give; §8.3's bug).
    ``tail``: the (K+1)-bucket form of the module docstring instead (value D, gradient p_k (a_k − b_k − r) / N).
    Returns a 0-d tensor in at least float32.
    """
    _check_shapes("student_logprobs", student_logprobs, "teacher_logprobs", teacher_logprobs, mask)
    dtype = _compute_dtype(student_logprobs)
    keep = _valid_entries(student_logprobs, teacher_logprobs, mask)
    zero = torch.zeros((), dtype=dtype, device=student_logprobs.device)
    # where() (not multiplication) so that -inf/NaN at dropped entries yields value 0 and grad 0.
    a = torch.where(keep, student_logprobs.to(dtype), zero)
    b = torch.where(keep, teacher_logprobs.detach().to(dtype), zero)
    a_sg = a.detach()
    if tail:
        value, coef = _with_tail_sc(a, b, keep)
        per_position = value.to(dtype) + (coef.to(dtype) * (a - a_sg)).sum(dim=-1)
        return _normalise(per_position.sum(), mask, num_tokens)
    w = _masked_softmax(a_sg, keep)
    coef = w * (a_sg - b)  # sg(w_k (a_k - b_k)); exactly 0 at dropped entries
    per_position = coef.sum(dim=-1) + (coef * (a - a_sg)).sum(dim=-1)
    return _normalise(per_position.sum(), mask, num_tokens)


def teacher_context_loss(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: NumTokens = None,
    tail: bool = False,
) -> torch.Tensor:
    """Forward KL to the teacher's top-K on the selected trajectory (brts-reference §8.3 `teacher_topk`).

    `student_logprobs` ℓ [..., K] (with grad) at the TEACHER's top-K ids; `teacher_logprobs` c
    [..., K]: the teacher's top-K log-probs; π = softmax_K(c). Value Σ_masked Σ_k π_k (c_k − ℓ_k) / N,
    gradient −π_k / N. ``tail``: the (K+1)-bucket form of the module docstring instead (value F, gradient
    (−q_k + q_T p_k / p_T) / N). Returns a 0-d tensor in at least float32.
    """
    _check_shapes("student_logprobs", student_logprobs, "teacher_logprobs", teacher_logprobs, mask)
    dtype = _compute_dtype(student_logprobs)
    keep = _valid_entries(student_logprobs, teacher_logprobs, mask)
    zero = torch.zeros((), dtype=dtype, device=student_logprobs.device)
    ell = torch.where(keep, student_logprobs.to(dtype), zero)
    c = torch.where(keep, teacher_logprobs.detach().to(dtype), zero)
    if tail:
        value, coef = _with_tail_tc(ell, c, keep)
        per_position = value.to(dtype) + (coef.to(dtype) * (ell - ell.detach())).sum(dim=-1)
        return _normalise(per_position.sum(), mask, num_tokens)
    pi = _masked_softmax(c, keep)
    per_position = (pi * (c - ell)).sum(dim=-1)
    return _normalise(per_position.sum(), mask, num_tokens)


def dual_branch_loss(
    sc_student_logprobs: torch.Tensor,
    sc_teacher_logprobs: torch.Tensor,
    sc_mask: torch.Tensor,
    tc_student_logprobs: torch.Tensor | None = None,
    tc_teacher_logprobs: torch.Tensor | None = None,
    tc_mask: torch.Tensor | None = None,
    lam: float = 1.0,
    sc_num_tokens: NumTokens = None,
    tc_num_tokens: NumTokens = None,
    sc_tail: bool = False,
    tc_tail: bool = False,
) -> DualBranchLoss:
    """L = L_SC + λ·L_TC, each branch a token-mean over its own mask (brts-reference §8.4).

    The teacher-context inputs may all be None (no selected trajectory anywhere in the batch: the
    student-only baseline, or every prompt skipped by ``tier3="skip"``); L_TC is then 0. Prompts
    skipped individually are simply masked out of `tc_mask`.
    """
    LossConfig(lam=lam)  # validates λ
    l_sc = student_context_loss(sc_student_logprobs, sc_teacher_logprobs, sc_mask, sc_num_tokens, tail=sc_tail)
    tc_given = [x is not None for x in (tc_student_logprobs, tc_teacher_logprobs, tc_mask)]
    if all(tc_given):
        assert tc_student_logprobs is not None and tc_teacher_logprobs is not None and tc_mask is not None
        l_tc = teacher_context_loss(tc_student_logprobs, tc_teacher_logprobs, tc_mask, tc_num_tokens, tail=tc_tail)
    elif not any(tc_given):
        l_tc = torch.zeros((), dtype=l_sc.dtype, device=l_sc.device)
    else:
        raise ValueError("tc_student_logprobs, tc_teacher_logprobs and tc_mask must be given together or not at all")
    total = l_sc + lam * l_tc
    return DualBranchLoss(total=total, student_context=l_sc, teacher_context=l_tc)
