"""The student's micro-batches: planning by length, lockstep across ranks, one collate, one row/token alignment.

Both kinds of student forward go through here: the training forwards of ``update.Updater`` and the no-grad top-K
forwards of ``student_forward`` (along the rollouts, and along the candidates in ``prefix`` overlap mode). So a
sequence is padded, positioned and split into micro-batches the same way whichever forward reads it.

Which row predicts which token (the alignment, derived once here)
------------------------------------------------------------------
A causal LM reads tokens x_0 .. x_{S-1}; its hidden state at position s has seen x_0 .. x_s only, and the logits
there are its distribution of the NEXT token, x_{s+1}. A training sequence is a prompt of P tokens followed by a
response, so ``response_start`` = P and response token t is x_{P+t}, for t = 0 .. S-P-1. Its distribution is
therefore read at position

    s(t) = P - 1 + t,        t = 0 .. S-P-1,   i.e. positions P-1 .. S-2,

one row per response token (S - P rows). Position S - 1 predicts a token after the sequence and is never read;
P >= 1 because the first token of a sequence has no prediction (``check_response_start``). Row t of every
per-response array in the trainer (the student's top-K, the teacher's log-probs, the masks) is response token t,
and ``response_positions`` is the only place that turns t into s(t).

Padding: sequences are right-padded with id 0 and attention mask 0. Causal attention means a real position never
sees a later one, so padding changes no row that is read (up to kernel numerics). Rows beyond a sequence's own
response (a shorter sequence in the micro-batch) point at position 0: a real, finite position whose output the
callers mask out or drop.

Lockstep: under FSDP2 every forward is a collective, so every rank must run the same number of micro-batches.
``lockstep_plan`` pads each rank's plan with empty micro-batches up to the largest count on any rank; a caller runs
an empty one on ``DUMMY_TOKENS`` (and masks or drops its result).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["DUMMY_RESPONSE_START", "DUMMY_TOKENS", "all_reduce_max", "all_reduce_sum", "check_response_start",
           "collate", "lockstep_plan", "plan_by_length", "response_positions"]

#: The stand-in sequence of an empty lockstep micro-batch: two tokens, one response row (whose result is unused).
DUMMY_TOKENS: tuple[int, int] = (0, 0)
DUMMY_RESPONSE_START = 1


def check_response_start(response_start: int, length: int, name: str = "response_start") -> None:
    """Raise ValueError naming ``name`` unless the sequence has a prompt token and a response token."""
    if not 1 <= response_start < length:
        raise ValueError(f"{name}: must be in 1..{length - 1}, got {response_start}")


def response_positions(response_start: int, length: int) -> torch.Tensor:
    """LongTensor[length - response_start]: entry t is the position whose output predicts response token t,
    ``response_start - 1 + t`` (the derivation is in the module docstring)."""
    check_response_start(response_start, length)
    return torch.arange(response_start - 1, length - 1)


def collate(sequences: Sequence[Sequence[int] | torch.Tensor], response_starts: Sequence[int],
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids [B, S], attention_mask [B, S], positions [B, R])``, all long, on ``device``: right-padded ids
    (0), the mask of real tokens, and per sequence its ``response_positions`` (0 beyond its own R rows)."""
    lengths = [len(s) for s in sequences]
    rows = max(n - start for n, start in zip(lengths, response_starts, strict=True))
    input_ids = torch.zeros(len(sequences), max(lengths), dtype=torch.long)
    attention = torch.zeros(len(sequences), max(lengths), dtype=torch.long)
    positions = torch.zeros(len(sequences), rows, dtype=torch.long)
    for b, (seq, n, start) in enumerate(zip(sequences, lengths, response_starts)):
        input_ids[b, :n] = torch.as_tensor(seq, dtype=torch.long)
        attention[b, :n] = 1
        positions[b, : n - start] = response_positions(start, n)
    return input_ids.to(device), attention.to(device), positions.to(device)


def plan_by_length(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy, in order: a micro-batch (indices) grows while (sequences × longest length) stays within ``budget``.

    In order rather than sorted, so a plan depends only on the sequence of lengths (a resumed run plans the same);
    a single sequence longer than the budget still gets a micro-batch of its own."""
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


def lockstep_plan(lengths: Sequence[int], budget: int, device: torch.device) -> list[list[int]]:
    """``plan_by_length``, then empty micro-batches up to the largest count on any rank (collective: every rank
    calls it, with any number of sequences, also none)."""
    plan = plan_by_length(lengths, budget)
    rounds = all_reduce_max(len(plan), device)
    return plan + [[] for _ in range(rounds - len(plan))]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The values summed over all ranks, in float64 (the values themselves without a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest ``value`` on any rank (the value itself without a process group)."""
    t = torch.tensor([value], dtype=torch.long, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
