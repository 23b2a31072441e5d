"""One teacher trajectory per prompt (``prefix``) or per rollout row (``position``), against the live student.

Pure functions over tensors and candidate records, no I/O; the loop feeds them the student's top-K.

Only the candidates that can still win need an overlap: the priority rule (``selection.select_candidate``)
compares overlaps only inside the deciding group — the correct Tier-1 candidates if there is one, else the
correct Tier-2 ones, else all Tier-1 (Tier 3) — so ``deciding_group`` names that group and, in ``prefix`` mode, the
loop runs the student's forward on those candidates only, and on none when the group has a single member
(correctness alone decides). The choice is identical to scoring every candidate; what the metrics call the
overlap "of the others" is then the mean over the scored losers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from brts.trainer.selection import overlap_scores, position_overlap_matrix, select_candidate, valid_mask_from_lengths

__all__ = ["Choice", "Pool", "choose_position", "choose_prefix", "deciding_group", "topk_overlap"]


@dataclass
class Pool:
    """A prompt's candidates as the server sent them, split by tier (``Candidate`` records of the client)."""

    tier1: list[Any]
    tier2: list[Any]

    @classmethod
    def of(cls, candidates: Sequence[Any]) -> "Pool":
        return cls([c for c in candidates if c.tier == 1], [c for c in candidates if c.tier == 2])


@dataclass
class Choice:
    """The chosen candidate (None: no teacher branch for this prompt/row) and the overlaps behind the choice."""

    tier: int | None  # 1, 2, 3, or None (skipped)
    candidate: Any | None
    overlap: float | None  # of the chosen one, when it was scored
    others: list[float]  # of the scored candidates not chosen


def deciding_group(pool: Pool, tier3: str) -> list[tuple[int, int]]:
    """``[(tier, index), ...]`` of the candidates among which overlap decides (see the module docstring)."""
    correct1 = [(1, i) for i, c in enumerate(pool.tier1) if c.correct]
    if correct1:
        return correct1
    correct2 = [(2, i) for i, c in enumerate(pool.tier2) if c.correct]
    if correct2:
        return correct2
    if tier3 == "skip":
        return []
    return [(1, i) for i in range(len(pool.tier1))]


def _candidate(pool: Pool, tier: int, index: int) -> Any:
    return (pool.tier1 if tier == 1 else pool.tier2)[index]


def _decide(pool: Pool, overlaps: dict[tuple[int, int], float], tier3: str) -> Choice:
    t1 = [(bool(c.correct), overlaps.get((1, i), 0.0)) for i, c in enumerate(pool.tier1)]
    t2 = [(bool(c.correct), overlaps.get((2, i), 0.0)) for i, c in enumerate(pool.tier2)]
    picked = select_candidate(t1, t2, tier3)  # type: ignore[arg-type]
    if picked is None:
        return Choice(None, None, None, list(overlaps.values()))
    tier, index = picked
    key = (2 if tier == 2 else 1, index)
    others = [v for k, v in overlaps.items() if k != key]
    return Choice(tier, _candidate(pool, *key), overlaps.get(key), others)


def choose_prefix(pool: Pool, student_topk: dict[tuple[int, int], torch.Tensor], tier3: str) -> Choice:
    """``prefix`` mode: ``student_topk[(tier, i)]`` is the student's top-K ids [L, K] along candidate (tier, i)
    under its own prefix, for the members of ``deciding_group`` that were scored (none when it has one member)."""
    overlaps = {}
    for key, topk in student_topk.items():
        ids = torch.as_tensor(_candidate(pool, *key).token_ids, dtype=torch.long)
        valid = torch.ones(1, ids.numel(), dtype=torch.bool)
        overlaps[key] = float(overlap_scores(ids.unsqueeze(0), topk[: ids.numel()], valid)[0])
    return _decide(pool, overlaps, tier3)


def choose_position(pool: Pool, rollout_topk: Sequence[torch.Tensor], tier3: str) -> list[Choice]:
    """``position`` mode (the reference's): one choice per rollout row of the prompt; ``rollout_topk[r]`` is the
    student's top-K ids [R_r, K] along its rollout r (row t = response index t)."""
    group = deciding_group(pool, tier3)
    if not group or not rollout_topk:
        return [_decide(pool, {}, tier3) for _ in rollout_topk]
    cands = [_candidate(pool, *key) for key in group]
    length = max(len(c.token_ids) for c in cands)
    ids = torch.full((len(cands), length), -1, dtype=torch.long)
    for j, c in enumerate(cands):
        ids[j, : len(c.token_ids)] = torch.as_tensor(c.token_ids, dtype=torch.long)
    rows = max(int(t.shape[0]) for t in rollout_topk)
    k = int(rollout_topk[0].shape[1])
    stacked = torch.full((len(rollout_topk), rows, k), -1, dtype=torch.long)
    for r, t in enumerate(rollout_topk):
        stacked[r, : t.shape[0]] = t
    matrix = position_overlap_matrix(ids, [len(c.token_ids) for c in cands], stacked,
                                     [int(t.shape[0]) for t in rollout_topk])
    return [_decide(pool, dict(zip(group, matrix[r].tolist())), tier3) for r in range(len(rollout_topk))]


def topk_overlap(student_ids: np.ndarray | torch.Tensor, teacher_ids: np.ndarray | torch.Tensor) -> float:
    """Mean over positions of |student top-K ∩ teacher top-K| / K (a diagnostic of how close the two are)."""
    s = torch.as_tensor(np.array(student_ids), dtype=torch.long)
    t = torch.as_tensor(np.array(teacher_ids), dtype=torch.long)
    rows = min(s.shape[0], t.shape[0])
    if rows == 0:
        return 0.0
    s, t = s[:rows], t[:rows]
    hits = ((s.unsqueeze(-1) == t.unsqueeze(-2)) & (s.unsqueeze(-1) >= 0)).any(-1).sum(-1).double()
    return float((hits / max(s.shape[1], 1)).mean())


def valid_rows(length: int, keep: int | None) -> torch.Tensor:
    """Mask [length]: True at the first ``keep`` rows (all when None): the reference's truncation (§6)."""
    return valid_mask_from_lengths([length if keep is None else min(keep, length)], length)[0]
