"""One optimizer step on the dual-branch loss, exactly the same computation at any number of ranks.

Why it is exact (the reference is not, brts-reference §8.2, §10 item 7):
- each branch's loss is divided by the all-reduced count of masked-in tokens of the WHOLE step (every rank,
  every micro-batch), and FSDP2's divide factor is 1 (``fsdp.shard_student``), so gradients sum to the global
  token mean whatever the split;
- master weights, gradients and the optimizer state are fp32 by default (bf16 is only the compute dtype on GPU;
  ``master_dtype: bfloat16`` keeps them in bf16 as the authors' code does, then rounding makes it inexact);
- every rank runs the same number of micro-batches per branch (ranks short of work run an all-masked one), so
  FSDP2's collectives always pair up.
A step whose global gradient norm is not finite is skipped: the gradients are dropped, the weights untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from brts.trainer.fsdp import fsdp_modules
from brts.trainer.losses import student_context_loss, teacher_context_loss, topk_masses
from brts.trainer.microbatch import (
    DUMMY_RESPONSE_START,
    DUMMY_TOKENS,
    all_reduce_max,
    all_reduce_sum,
    check_response_start,
    collate,
    lockstep_plan,
)


@dataclass
class TrainSequence:
    """One training sequence: prompt + response ids, where the response starts, and for each response row t
    (predicting ``token_ids[response_start + t]``, see ``microbatch``) the K ids to score and the teacher's
    log-probs there."""

    token_ids: torch.Tensor  # long [L]
    response_start: int
    ids: torch.Tensor  # long [R, K], -1 = padding
    teacher_logprobs: torch.Tensor  # float [R, K], -inf at padding
    mask: torch.Tensor | None = None  # bool [R]; default: every response position

    def __post_init__(self) -> None:
        check_response_start(self.response_start, int(self.token_ids.numel()))
        rows = int(self.token_ids.numel()) - self.response_start
        if self.ids.shape != self.teacher_logprobs.shape or self.ids.shape[0] != rows:
            raise ValueError(f"ids/teacher_logprobs: must both be [{rows}, K], got {tuple(self.ids.shape)} and "
                             f"{tuple(self.teacher_logprobs.shape)}")
        if self.mask is None:
            self.mask = torch.ones(rows, dtype=torch.bool)
        elif self.mask.shape != (rows,):
            raise ValueError(f"mask: must be [{rows}], got {tuple(self.mask.shape)}")

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())  # type: ignore[union-attr]


def teacher_rows_for_student(topk_ids: np.ndarray, topk_logprobs: np.ndarray,
                             student_vocab: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The teacher's top-K rows as the teacher-context branch gathers them: ``(ids long, log-probs float32, n)``
    with every id the student has no logit for (``>= student_vocab``) turned into padding (-1, -inf), and ``n``
    the number of entries so turned.

    Why: a teacher may have a wider logits dimension than the student of the same tokenizer (the paper's 7B
    teacher, 152,064, with the 1.5B student, 151,936): its padding rows can reach a top-K, and gathering the
    student's log-prob there has no meaning (and would raise). Padding is what ``losses.teacher_context_loss``
    already drops: π is renormalised over the ids both sides have, the same rule as the -1 padding of short top-K.
    """
    ids = torch.from_numpy(topk_ids.astype("int64"))
    lps = torch.from_numpy(topk_logprobs.astype("float32"))
    beyond = ids >= student_vocab
    n = int(beyond.sum())
    if n:
        ids = ids.masked_fill(beyond, -1)
        lps = lps.masked_fill(beyond, float("-inf"))
    return ids, lps, n


@dataclass(frozen=True)
class UpdateConfig:
    lam: float = 1.0
    grad_clip: float = 1.0
    token_budget: int = 32768  # padded tokens per micro-batch
    sc_tail: bool = False  # a (K+1)-th tail bucket in L_SC (losses.py, "Tail buckets")
    tc_tail: bool = False  # the same in L_TC


@dataclass
class StepStats:
    loss: float
    student_context: float
    teacher_context: float
    grad_norm: float
    skipped: bool
    sc_tokens: int
    tc_tokens: int
    micro_batches: int
    # per-token top-K probability masses (issue #24); NaN for a branch with no tokens in the step
    sc_student_mass: float = float("nan")  # the student's mass on its own top-K
    sc_teacher_mass: float = float("nan")  # the teacher's mass on that same set
    tc_teacher_mass: float = float("nan")  # the teacher's mass on its top-K (the chosen candidate)
    tc_student_mass: float = float("nan")  # the student's mass on that set


def _collate(batch: Sequence[TrainSequence], k: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``microbatch.collate``'s ids, attention mask and positions, then per response row (padded to the longest
    response and to ``k``) the ids to gather, the teacher's log-probs and the mask."""
    input_ids, attention, positions = collate([s.token_ids for s in batch], [s.response_start for s in batch], device)
    b, rows = positions.shape
    ids = torch.full((b, rows, k), -1, dtype=torch.long)
    teacher = torch.full((b, rows, k), float("-inf"))
    mask = torch.zeros(b, rows, dtype=torch.bool)
    for i, s in enumerate(batch):
        r = int(s.ids.shape[0])
        ids[i, :r, : s.ids.shape[1]] = s.ids
        teacher[i, :r, : s.ids.shape[1]] = s.teacher_logprobs.float()
        mask[i, :r] = s.mask  # type: ignore[assignment]
    return (input_ids, attention, positions, *(t.to(device) for t in (ids, teacher, mask)))


def _dummy(k: int) -> TrainSequence:
    """An all-masked ``DUMMY_TOKENS`` sequence for the empty micro-batches of ``lockstep_plan``."""
    return TrainSequence(torch.tensor(DUMMY_TOKENS), DUMMY_RESPONSE_START, torch.full((1, k), -1, dtype=torch.long),
                         torch.full((1, k), float("-inf")), torch.zeros(1, dtype=torch.bool))


class Updater:
    """``Updater(wrapper, optimizer, config).step(student_seqs, teacher_seqs)`` → ``StepStats``."""

    def __init__(self, wrapper: nn.Module, optimizer: torch.optim.Optimizer, config: UpdateConfig,
                 device: torch.device) -> None:
        self.wrapper, self.optimizer, self.config, self.device = wrapper, optimizer, config, device
        self._fsdp = fsdp_modules(wrapper)

    def _set_sync(self, sync: bool) -> None:
        for m in self._fsdp:
            m.set_requires_gradient_sync(sync, recurse=False)

    def step(self, student: Sequence[TrainSequence], teacher: Sequence[TrainSequence] = ()) -> StepStats:
        cfg = self.config
        k_sc = max([int(s.ids.shape[1]) for s in student] or [1])
        k_tc = max([int(s.ids.shape[1]) for s in teacher] or [1])
        n_sc, n_tc = all_reduce_sum([sum(s.tokens for s in student), sum(s.tokens for s in teacher)], self.device)
        k_sc, k_tc = all_reduce_max(k_sc, self.device), all_reduce_max(k_tc, self.device)
        plans = []
        for seqs, k, n, branch in ((student, k_sc, n_sc, "sc"), (teacher, k_tc, n_tc, "tc")):
            if n == 0:
                continue  # no rank has tokens in this branch: L = 0 (e.g. the student-only baseline)
            plan = lockstep_plan([int(s.token_ids.numel()) for s in seqs], cfg.token_budget, self.device)
            plans += [(branch, [seqs[i] for i in batch] or [_dummy(k)], k, n) for batch in plan]
        totals = {"sc": torch.zeros((), dtype=torch.float64), "tc": torch.zeros((), dtype=torch.float64)}
        masses = torch.zeros(4, dtype=torch.float64)  # sc student, sc teacher, tc student, tc teacher
        self.optimizer.zero_grad(set_to_none=True)
        for i, (branch, batch, k, n) in enumerate(plans):
            self._set_sync(i == len(plans) - 1)
            input_ids, attention, positions, ids, teacher_lp, mask = _collate(batch, k, self.device)
            student_lp = self.wrapper(input_ids, attention, positions, ids)
            at = 0 if branch == "sc" else 2
            masses[at : at + 2] += torch.stack(topk_masses(student_lp.detach(), teacher_lp, mask)).cpu()
            if branch == "sc":
                loss = student_context_loss(student_lp, teacher_lp, mask, num_tokens=n, tail=cfg.sc_tail)
                (loss).backward()
            else:
                loss = teacher_context_loss(student_lp, teacher_lp, mask, num_tokens=n, tail=cfg.tc_tail)
                (cfg.lam * loss).backward()
            totals[branch] += loss.detach().double().cpu()
        self._set_sync(True)
        sc, tc, *mass = all_reduce_sum([float(totals["sc"]), float(totals["tc"]), *masses.tolist()], self.device)
        params = [p for p in self.wrapper.parameters() if p.grad is not None]
        grad_norm = 0.0
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP2
        skipped = not math.isfinite(grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        per = lambda total, n: total / n if n else float("nan")  # noqa: E731 - a one-line helper beside its use
        return StepStats(sc + cfg.lam * tc, sc, tc, grad_norm, skipped, int(n_sc), int(n_tc), len(plans),
                         per(mass[0], n_sc), per(mass[1], n_sc), per(mass[3], n_tc), per(mass[2], n_tc))


def make_optimizer(wrapper: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(wrapper.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
