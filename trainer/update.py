"""One optimizer step on the dual-branch loss, exactly the same computation at any number of ranks.

Why it is exact (the reference is not, brts-reference §8.2, §10 item 7):
- each branch's loss is divided by the all-reduced count of masked-in tokens of the WHOLE step (every rank,
  every micro-batch), and FSDP2's divide factor is 1 (``fsdp.shard_student``), so gradients sum to the global
  token mean whatever the split;
- master weights, gradients and the optimizer state are fp32 (bf16 is only the compute dtype on GPU);
- every rank runs the same number of micro-batches per branch (ranks short of work run an all-masked one), so
  FSDP2's collectives always pair up.
A step whose global gradient norm is not finite is skipped: the gradients are dropped, the weights untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from brts.trainer.fsdp import fsdp_modules
from brts.trainer.losses import student_context_loss, teacher_context_loss


@dataclass
class Sequence_:
    """One training sequence: prompt + response ids, where the response starts, and for each response position
    t (predicting ``token_ids[response_start + t]``) the K ids to score and the teacher's log-probs there."""

    token_ids: torch.Tensor  # long [L]
    response_start: int
    ids: torch.Tensor  # long [R, K], -1 = padding
    teacher_logprobs: torch.Tensor  # float [R, K], -inf at padding
    mask: torch.Tensor | None = None  # bool [R]; default: every response position

    def __post_init__(self) -> None:
        rows = int(self.token_ids.numel()) - self.response_start
        if not 1 <= self.response_start < self.token_ids.numel():
            raise ValueError(f"response_start: must be in 1..{self.token_ids.numel() - 1}, got {self.response_start}")
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


@dataclass(frozen=True)
class UpdateConfig:
    lam: float = 1.0
    grad_clip: float = 1.0
    token_budget: int = 32768  # padded tokens per micro-batch


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


def plan_by_length(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy, in order: a micro-batch (indices) grows while (sequences × longest length) stays within ``budget``."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > budget:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def pack(seqs: Sequence[Sequence_], budget: int) -> list[list[Sequence_]]:
    """``plan_by_length`` over the sequences' token counts."""
    return [[seqs[i] for i in batch] for batch in plan_by_length([int(s.token_ids.numel()) for s in seqs], budget)]


def _collate(batch: Sequence[Sequence_], k: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask, the row positions of each response, gather ids, teacher log-probs, mask."""
    length = max(int(s.token_ids.numel()) for s in batch)
    rows = max(int(s.ids.shape[0]) for s in batch)
    b = len(batch)
    input_ids = torch.zeros(b, length, dtype=torch.long)
    attention = torch.zeros(b, length, dtype=torch.long)
    positions = torch.zeros(b, rows, dtype=torch.long)
    ids = torch.full((b, rows, k), -1, dtype=torch.long)
    teacher = torch.full((b, rows, k), float("-inf"))
    mask = torch.zeros(b, rows, dtype=torch.bool)
    for i, s in enumerate(batch):
        n, r = int(s.token_ids.numel()), int(s.ids.shape[0])
        input_ids[i, :n] = s.token_ids
        attention[i, :n] = 1
        positions[i, :r] = torch.arange(s.response_start - 1, n - 1)
        ids[i, :r, : s.ids.shape[1]] = s.ids
        teacher[i, :r, : s.ids.shape[1]] = s.teacher_logprobs.float()
        mask[i, :r] = s.mask  # type: ignore[assignment]
    return tuple(t.to(device) for t in (input_ids, attention, positions, ids, teacher, mask))


def _dummy(k: int) -> Sequence_:
    """An all-masked two-token sequence for ranks with fewer micro-batches (keeps FSDP2 collectives paired)."""
    return Sequence_(torch.tensor([0, 0]), 1, torch.full((1, k), -1, dtype=torch.long), torch.full((1, k), float("-inf")),
                     torch.zeros(1, dtype=torch.bool))


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _all_max(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.long, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class Updater:
    """``Updater(wrapper, optimizer, config).step(student_seqs, teacher_seqs)`` → ``StepStats``."""

    def __init__(self, wrapper: nn.Module, optimizer: torch.optim.Optimizer, config: UpdateConfig,
                 device: torch.device) -> None:
        self.wrapper, self.optimizer, self.config, self.device = wrapper, optimizer, config, device
        self._fsdp = fsdp_modules(wrapper)

    def _set_sync(self, sync: bool) -> None:
        for m in self._fsdp:
            m.set_requires_gradient_sync(sync, recurse=False)

    def step(self, student: Sequence[Sequence_], teacher: Sequence[Sequence_] = ()) -> StepStats:
        cfg = self.config
        k_sc = max([int(s.ids.shape[1]) for s in student] or [1])
        k_tc = max([int(s.ids.shape[1]) for s in teacher] or [1])
        n_sc, n_tc = _all_sum([sum(s.tokens for s in student), sum(s.tokens for s in teacher)], self.device)
        k_sc, k_tc = _all_max(k_sc, self.device), _all_max(k_tc, self.device)
        plans = []
        for seqs, k, n, branch in ((student, k_sc, n_sc, "sc"), (teacher, k_tc, n_tc, "tc")):
            if n == 0:
                continue  # no rank has tokens in this branch: L = 0 (e.g. the student-only baseline)
            batches = pack(seqs, cfg.token_budget)
            want = _all_max(len(batches), self.device)
            batches += [[_dummy(k)] for _ in range(want - len(batches))]
            plans += [(branch, b, k, n) for b in batches]
        totals = {"sc": torch.zeros((), dtype=torch.float64), "tc": torch.zeros((), dtype=torch.float64)}
        self.optimizer.zero_grad(set_to_none=True)
        for i, (branch, batch, k, n) in enumerate(plans):
            self._set_sync(i == len(plans) - 1)
            input_ids, attention, positions, ids, teacher_lp, mask = _collate(batch, k, self.device)
            student_lp = self.wrapper(input_ids, attention, positions, ids)
            if branch == "sc":
                loss = student_context_loss(student_lp, teacher_lp, mask, num_tokens=n)
                (loss).backward()
            else:
                loss = teacher_context_loss(student_lp, teacher_lp, mask, num_tokens=n)
                (cfg.lam * loss).backward()
            totals[branch] += loss.detach().double().cpu()
        self._set_sync(True)
        sc, tc = _all_sum([float(totals["sc"]), float(totals["tc"])], self.device)
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
        return StepStats(sc + cfg.lam * tc, sc, tc, grad_norm, skipped, int(n_sc), int(n_tc), len(plans))


def make_optimizer(wrapper: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(wrapper.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
