"""The student's no-grad forwards of a step: its top-K along given sequences, micro-batched, collective-safe.

Why here and not in the rollout engine: the top-K must come from the weights being trained (the FSDP2 model),
in the trainer's numerics, because it is what the student-context loss is built on (brts-reference §2 step 3).
Under FSDP2 every forward is a collective, so every rank runs the same number of micro-batches: a rank with less
work runs all-masked dummy ones (as ``update.Updater`` does for the training forwards).

``iter_student_topk`` yields each micro-batch's results as soon as it is computed, so the caller can send that
micro-batch's ``Score`` request to the teacher while the next one runs (issue #8: pipelined per micro-batch).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from brts.trainer.update import _all_max, plan_by_length

__all__ = ["TopKRows", "iter_student_topk", "student_topk"]

TopKRows = tuple[torch.Tensor, torch.Tensor]  # (ids long [R, k], log-probs float32 [R, k]) for one sequence


@torch.no_grad()
def iter_student_topk(wrapper: nn.Module, sequences: Sequence[Sequence[int]], response_starts: Sequence[int], k: int,
                      budget: int, device: torch.device) -> Iterator[tuple[list[int], list[TopKRows]]]:
    """Yield ``(indices, rows)`` per micro-batch: for each sequence index, the student's top-``k`` ids and
    log-probs at every response row (row t predicts ``sequence[response_start + t]``). Collective: every rank
    calls it, with any number of sequences (also none)."""
    for i, (seq, start) in enumerate(zip(sequences, response_starts, strict=True)):
        if not 1 <= start < len(seq):
            raise ValueError(f"response_starts[{i}]: must be in 1..{len(seq) - 1}, got {start}")
    plan = plan_by_length([len(s) for s in sequences], budget)
    rounds = _all_max(len(plan), device)
    for r in range(rounds):
        batch = plan[r] if r < len(plan) else []
        seqs = [sequences[i] for i in batch] or [[0, 0]]  # a dummy keeps the collectives paired
        starts = [response_starts[i] for i in batch] or [1]
        length = max(len(s) for s in seqs)
        rows = max(len(s) - st for s, st in zip(seqs, starts))
        input_ids = torch.zeros(len(seqs), length, dtype=torch.long)
        attention = torch.zeros(len(seqs), length, dtype=torch.long)
        positions = torch.zeros(len(seqs), rows, dtype=torch.long)
        for b, (s, st) in enumerate(zip(seqs, starts)):
            input_ids[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            attention[b, : len(s)] = 1
            positions[b, : len(s) - st] = torch.arange(st - 1, len(s) - 1)
        ids, lps = wrapper(input_ids.to(device), attention.to(device), positions.to(device), None, k)
        if batch:
            ids, lps = ids.cpu(), lps.float().cpu()
            yield batch, [(ids[b, : len(seqs[b]) - starts[b]], lps[b, : len(seqs[b]) - starts[b]])
                          for b in range(len(batch))]


def student_topk(wrapper: nn.Module, sequences: Sequence[Sequence[int]], response_starts: Sequence[int], k: int,
                 budget: int, device: torch.device) -> list[TopKRows]:
    """All of ``iter_student_topk`` at once, in the order of ``sequences``."""
    out: list[TopKRows | None] = [None] * len(sequences)
    for batch, rows in iter_student_topk(wrapper, sequences, response_starts, k, budget, device):
        for i, r in zip(batch, rows):
            out[i] = r
    return out  # type: ignore[return-value]
