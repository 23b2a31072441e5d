"""The student's no-grad forwards of a step: its top-K along given sequences, micro-batched, collective-safe.

Why here and not in the rollout engine: the top-K must come from the weights being trained (the FSDP2 model),
in the trainer's numerics, because it is what the student-context loss is built on (brts-reference §2 step 3).
Under FSDP2 every forward is a collective, so every rank runs the same number of micro-batches
(``microbatch.lockstep_plan``, as ``update.Updater`` does for the training forwards): a rank with less work runs
dummy ones and drops their results.

``iter_student_topk`` yields each micro-batch's results as soon as it is computed, so the caller can send that
micro-batch's ``Score`` request to the teacher while the next one runs (issue #8: pipelined per micro-batch).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from brts.trainer.microbatch import DUMMY_RESPONSE_START, DUMMY_TOKENS, check_response_start, collate, lockstep_plan

__all__ = ["TopKRows", "iter_student_topk", "student_topk"]

TopKRows = tuple[torch.Tensor, torch.Tensor]  # (ids long [R, k], log-probs float32 [R, k]) for one sequence


@torch.no_grad()
def iter_student_topk(wrapper: nn.Module, sequences: Sequence[Sequence[int]], response_starts: Sequence[int], k: int,
                      budget: int, device: torch.device) -> Iterator[tuple[list[int], list[TopKRows]]]:
    """Yield ``(indices, rows)`` per micro-batch: for each sequence index, the student's top-``k`` ids and
    log-probs at every response row (row t predicts ``sequence[response_start + t]``, ``microbatch``'s alignment).
    Collective: every rank calls it, with any number of sequences (also none)."""
    for i, (seq, start) in enumerate(zip(sequences, response_starts, strict=True)):
        check_response_start(start, len(seq), f"response_starts[{i}]")  # before any collective, on every rank
    for batch in lockstep_plan([len(s) for s in sequences], budget, device):
        seqs = [sequences[i] for i in batch] or [DUMMY_TOKENS]
        starts = [response_starts[i] for i in batch] or [DUMMY_RESPONSE_START]
        ids, lps = wrapper(*collate(seqs, starts, device), None, k)
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
