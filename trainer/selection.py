"""BRTS teacher-candidate selection: the overlap score, the three-tier priority rule, and the choice per prompt/row.

Pure functions over tensors and candidate records, no I/O. The loop computes the student's top-K ids (see
`brts.trainer.student_forward`), and this module turns them into overlap scores and picks one candidate per prompt
(``prefix`` mode) or per rollout row (``position`` mode): `choose_prefix`, `choose_position`.

Overlap score (brts-reference §3.3)
-----------------------------------
For a candidate with token ids z_0..z_{L-1}, a set of valid positions V and the student's top-K ids
S_t at each position t:

    overlap = |{ t in V : z_t in S_t }| / |V|        (0.0 when V is empty)

Padding id -1 (`brts.shared.topk.PAD_ID`) in S_t never matches. Two modes decide where S_t comes from
(``train.overlap_mode``, `brts.shared.config.OverlapMode`):

* ``prefix`` (our default, the paper's intent; brts-reference §15 "intended"): S_t is the student's
  top-K predicting z_t given the **candidate's own prefix**, i.e. a no-grad student forward on
  (original prompt, z), row t of its response (`brts.trainer.microbatch` derives which position that is).
  The score is then a likelihood-like "would the live student have proposed this token here".
  The overlap does not depend on which student rollout of the prompt we look at, so one selection
  per prompt serves all n rollout rows.
* ``position`` (the reference code's, §3.3): S_t is the student's top-K at response index t of the
  student's **own rollout**, computed under a different prefix. Beyond the rollout's length the
  reference has zero-filled rows (id 0, §3.3); we pad with -1 instead, so such positions are plain
  misses (the reference would count a token 0 there as a hit; a deliberate, harmless deviation).
  Because S_t depends on the rollout, with n > 1 rollouts per prompt the selection is made per
  rollout row (`position_overlap_matrix`, `choose_position`), as the reference does (§2 step 1).

In both modes V = the candidate's real tokens **including its EOS**. The reference drops the EOS
because its pad id equals its EOS id and it builds V as ``z != pad`` (§3.3, §6); we always build V
from lengths (`valid_mask_from_lengths`) and never from ``id != pad``, since pad may equal EOS.

Priority rule (brts-reference §3.4, §4.3, §5)
---------------------------------------------
1. the correct Tier-1 candidate with the highest overlap;
2. else the correct Tier-2 (hinted) candidate with the highest overlap;
3. else the Tier-1 candidate with the highest overlap, correct or not (``tier3="most_similar"``), or
   no teacher branch at all for that prompt (``tier3="skip"``; the README's ``fallback=skip``,
   which the reference never implemented, §5).

Ties go to the lowest index (the reference's first-max argmax), except inside a cross-teacher pool
(``candidate_teachers``, trainer/teacher_pool.py), where listing order would hand every tie to the first-listed
teacher: there a ``tie_seed`` (from the seed, the step and the prompt) draws the order. Tier-2 candidates are
never used in Tier 3, as in the reference. A prompt without Tier-1 candidates (no teacher pool) gets no teacher branch.

The rule is written once, in two halves: correctness alone names the **deciding group** (`deciding_group`: the
correct Tier-1 candidates if there is one, else the correct Tier-2 ones, else all Tier-1), and overlap decides
only inside it (`select_candidate`). So only the group's members need an overlap: in ``prefix`` mode the loop runs
the student's forward on `Pool.contested` only, and on none when the group has a single member (correctness alone
decides). The choice is identical to scoring every candidate; what the metrics call the overlap "of the others" is
then the mean over the scored losers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from brts.shared.topk import PAD_ID

if TYPE_CHECKING:  # the type only: the config layer reads files, and this module does no I/O
    from brts.shared.config import Tier3Policy

__all__ = ["Choice", "Key", "Pool", "choose_position", "choose_prefix", "deciding_group", "overlap_scores",
           "position_mode_topk", "position_overlap_matrix", "select_candidate", "tie_order", "topk_overlap",
           "valid_mask_from_lengths", "valid_rows"]

#: A candidate's place in its prompt's pool: (its tier, 1 or 2; its index within that tier).
Key = tuple[int, int]


# --------------------------------------------------------------------------------------------------
# masks and top-K layouts
# --------------------------------------------------------------------------------------------------


def valid_mask_from_lengths(lengths: torch.Tensor | Sequence[int], max_len: int) -> torch.Tensor:
    """BoolTensor[C, max_len], True at t < lengths[c].

    Validity comes from lengths, never from ``ids != pad``: with pad == EOS (DeepSeek tokenizers)
    the latter silently drops the EOS, which is what the reference does (§3.3) and we do not.
    """
    lengths_t = torch.as_tensor(lengths, dtype=torch.long)
    if lengths_t.dim() != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths_t.shape)}")
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    if lengths_t.numel() and (int(lengths_t.min()) < 0 or int(lengths_t.max()) > max_len):
        raise ValueError(f"lengths must lie in [0, max_len={max_len}], got {lengths_t.tolist()}")
    positions = torch.arange(max_len, device=lengths_t.device)
    return positions.unsqueeze(0) < lengths_t.unsqueeze(1)


def valid_rows(length: int, keep: int | None) -> torch.Tensor:
    """Mask [length]: True at the first ``keep`` rows (all when None): the reference's truncation of the chosen
    trajectory to the student's rollout length (§6, ``train.truncate_to_student``)."""
    return valid_mask_from_lengths([length if keep is None else min(keep, length)], length)[0]


def position_mode_topk(
    student_rollout_topk: torch.Tensor, length: int, rollout_length: int | None = None
) -> torch.Tensor:
    """Student top-K for the ``position`` mode: row t = the rollout's top-K at response index t.

    `student_rollout_topk` is LongTensor[R, K] from the student's no-grad forward on its own rollout
    (row t predicts rollout token t). The result is LongTensor[length, K]: truncated to `length`, or
    padded with -1 beyond R. Rows at t >= `rollout_length` (the rollout's real length, EOS included)
    are also set to -1, because top-K ids there come from padding positions and mean nothing (the
    reference reads zero-filled rows there, §3.3).
    """
    if student_rollout_topk.dim() != 2:
        raise ValueError(
            f"student_rollout_topk must be [R, K], got shape {tuple(student_rollout_topk.shape)}"
        )
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    num_rows, k = student_rollout_topk.shape
    real = num_rows if rollout_length is None else rollout_length
    if not 0 <= real <= num_rows:
        raise ValueError(f"rollout_length must lie in [0, {num_rows}], got {rollout_length}")
    out = torch.full((length, k), PAD_ID, dtype=torch.long, device=student_rollout_topk.device)
    n = min(length, real)
    out[:n] = student_rollout_topk[:n]
    return out


# --------------------------------------------------------------------------------------------------
# overlap scores
# --------------------------------------------------------------------------------------------------


def _hits(candidate_ids: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Bool [..., L]: candidate token t is among the (non-padding) top-K ids at t."""
    eq = (candidate_ids.unsqueeze(-1) == topk_ids) & (topk_ids != PAD_ID)
    return eq.any(dim=-1)


def overlap_scores(candidate_ids: torch.Tensor, student_topk_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The §3.3 overlap of each candidate: FloatTensor[C] (float64, so equal fractions compare equal).

    `candidate_ids` LongTensor[C, L] (padded), `student_topk_ids` LongTensor[C, L, K] or [L, K]
    (shared by all candidates; -1 never matches), `valid` BoolTensor[C, L]. A candidate without a
    valid position scores 0.0 (the reference's rule, TS:101-105).
    """
    if candidate_ids.dim() != 2:
        raise ValueError(f"candidate_ids must be [C, L], got shape {tuple(candidate_ids.shape)}")
    c, length = candidate_ids.shape
    if valid.shape != (c, length) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor of shape {(c, length)}, got {valid.dtype} {tuple(valid.shape)}")
    if student_topk_ids.dim() == 2:
        student_topk_ids = student_topk_ids.unsqueeze(0)
    if student_topk_ids.dim() != 3 or student_topk_ids.shape[1] != length or student_topk_ids.shape[0] not in (1, c):
        raise ValueError(
            f"student_topk_ids must be [C, L, K] or [L, K] with C={c}, L={length}, "
            f"got shape {tuple(student_topk_ids.shape)}"
        )
    hits = (_hits(candidate_ids, student_topk_ids) & valid).sum(dim=-1)
    denom = valid.sum(dim=-1)
    return torch.where(denom > 0, hits.double() / denom.clamp_min(1).double(), torch.zeros((), dtype=torch.float64))


def position_overlap_matrix(
    candidate_ids: torch.Tensor,
    candidate_lengths: torch.Tensor | Sequence[int],
    rollout_topk: torch.Tensor,
    rollout_lengths: torch.Tensor | Sequence[int],
) -> torch.Tensor:
    """``position``-mode overlaps of every candidate against every rollout row: FloatTensor[N, C].

    `candidate_ids` LongTensor[C, L] with real lengths `candidate_lengths` (EOS included);
    `rollout_topk` LongTensor[N, R, K], the student's top-K on each of the prompt's N rollouts,
    with real lengths `rollout_lengths`. Entry (i, j) is the §3.3 sim(i, j), on which row i's
    selection is made (`choose_position`).
    """
    if rollout_topk.dim() != 3:
        raise ValueError(f"rollout_topk must be [N, R, K], got shape {tuple(rollout_topk.shape)}")
    if candidate_ids.dim() != 2:
        raise ValueError(f"candidate_ids must be [C, L], got shape {tuple(candidate_ids.shape)}")
    lens = torch.as_tensor(rollout_lengths, dtype=torch.long)
    if lens.shape != (rollout_topk.shape[0],):
        raise ValueError(f"rollout_lengths must have {rollout_topk.shape[0]} entries, got {lens.tolist()}")
    length = candidate_ids.shape[1]
    valid = valid_mask_from_lengths(candidate_lengths, length).to(candidate_ids.device)
    rows = [
        overlap_scores(candidate_ids, position_mode_topk(rollout_topk[i], length, int(lens[i])), valid)
        for i in range(rollout_topk.shape[0])
    ]
    if not rows:
        return torch.zeros((0, candidate_ids.shape[0]), dtype=torch.float64)
    return torch.stack(rows)


def topk_overlap(student_ids: np.ndarray | torch.Tensor, teacher_ids: np.ndarray | torch.Tensor) -> float:
    """Mean over positions of |student top-K ∩ teacher top-K| / K: a diagnostic of how close the two are (the
    ``ts_overlap`` metric), with the overlap score's hit rule (padding never matches)."""
    s = torch.as_tensor(np.array(student_ids), dtype=torch.long)
    t = torch.as_tensor(np.array(teacher_ids), dtype=torch.long)
    rows = min(s.shape[0], t.shape[0])
    if rows == 0:
        return 0.0
    s, t = s[:rows], t[:rows]
    hits = _hits(s, t.unsqueeze(-2)).sum(-1).double()  # per student id j of row r: is it in the teacher's row r
    return float((hits / max(s.shape[1], 1)).mean())


# --------------------------------------------------------------------------------------------------
# the priority rule
# --------------------------------------------------------------------------------------------------


def deciding_group(tier1_correct: Sequence[bool], tier2_correct: Sequence[bool],
                   tier3: Tier3Policy) -> tuple[int | None, list[Key]]:
    """The first half of the priority rule: correctness alone names the candidates among which overlap decides.

    Returns ``(tier, members)``: ``(1, correct Tier-1)`` if there is one, else ``(2, correct Tier-2)``, else
    ``(3, every Tier-1)`` (``tier3="most_similar"``; Tier-2 candidates never enter Tier 3), and ``(None, [])``
    when there is no choice at all (no Tier-1 candidate, or Tier 3 reached with ``tier3="skip"``). Members are
    `Key` s in index order, which is what sends ties to the lowest index.
    """
    if tier3 not in ("most_similar", "skip"):  # the config validates it; this catches a direct caller's typo
        raise ValueError(f"tier3 must be one of most_similar, skip; got {tier3!r}")
    if not tier1_correct:
        return None, []
    correct1 = [(1, i) for i, ok in enumerate(tier1_correct) if ok]
    if correct1:
        return 1, correct1
    correct2 = [(2, i) for i, ok in enumerate(tier2_correct) if ok]
    if correct2:
        return 2, correct2
    if tier3 == "skip":
        return None, []
    return 3, [(1, i) for i in range(len(tier1_correct))]


def tie_order(group: Sequence[Key], tie_seed: int | None) -> list[Key]:
    """The order in which overlap ties are broken (the first maximum wins): the group's own, lowest index first,
    when ``tie_seed`` is None; else a permutation drawn from ``tie_seed`` (no member wins ties systematically)."""
    return list(group) if tie_seed is None else random.Random(tie_seed).sample(list(group), len(group))


def select_candidate(tier1_correct: Sequence[bool], tier2_correct: Sequence[bool], overlaps: Mapping[Key, float],
                     tier3: Tier3Policy, tie_seed: int | None = None) -> tuple[int, Key] | None:
    """The priority rule: ``(tier, key)`` of the deciding group's member with the highest overlap (the first in
    `tie_order` on ties), or None when `deciding_group` is empty.

    `overlaps` needs an entry for every member of a group of two or more; a group of one wins without one. A
    missing or non-finite overlap there is a caller bug and raises ValueError.
    """
    tier, group = deciding_group(tier1_correct, tier2_correct, tier3)
    if tier is None:
        return None
    if len(group) == 1:
        return tier, group[0]
    best: Key | None = None
    best_overlap = -math.inf
    for key in tie_order(group, tie_seed):
        overlap = float(overlaps.get(key, math.nan))
        if not math.isfinite(overlap):
            raise ValueError(f"overlap of candidate {key}: must be a finite number, got {overlaps.get(key)!r}")
        if best is None or overlap > best_overlap:
            best, best_overlap = key, overlap
    assert best is not None  # the group has members
    return tier, best


# --------------------------------------------------------------------------------------------------
# the choice per prompt (prefix) or per rollout row (position)
# --------------------------------------------------------------------------------------------------


@dataclass
class Pool:
    """A prompt's candidates as the server sent them, split by tier (``Candidate`` records of the client)."""

    tier1: list[Any]
    tier2: list[Any]

    @classmethod
    def of(cls, candidates: Sequence[Any]) -> "Pool":
        return cls([c for c in candidates if c.tier == 1], [c for c in candidates if c.tier == 2])

    def candidate(self, key: Key) -> Any:
        tier, index = key
        return (self.tier1 if tier == 1 else self.tier2)[index]

    def group(self, tier3: Tier3Policy) -> tuple[int | None, list[Key]]:
        """`deciding_group` of this pool."""
        return deciding_group([bool(c.correct) for c in self.tier1], [bool(c.correct) for c in self.tier2], tier3)

    def contested(self, tier3: Tier3Policy) -> list[Key]:
        """The candidates whose overlap the choice needs: the deciding group when it has two or more members."""
        _, members = self.group(tier3)
        return members if len(members) > 1 else []


@dataclass
class Choice:
    """The chosen candidate (None: no teacher branch for this prompt/row) and the overlaps behind the choice."""

    tier: int | None  # 1, 2, 3, or None (skipped)
    candidate: Any | None
    overlap: float | None  # of the chosen one, when it was scored
    others: list[float]  # of the scored candidates not chosen


def _choice(pool: Pool, overlaps: dict[Key, float], tier3: Tier3Policy, tie_seed: int | None) -> Choice:
    picked = select_candidate([bool(c.correct) for c in pool.tier1], [bool(c.correct) for c in pool.tier2],
                              overlaps, tier3, tie_seed)
    if picked is None:
        return Choice(None, None, None, list(overlaps.values()))
    tier, key = picked
    return Choice(tier, pool.candidate(key), overlaps.get(key), [v for k, v in overlaps.items() if k != key])


def choose_prefix(pool: Pool, student_topk: Mapping[Key, torch.Tensor], tier3: Tier3Policy,
                  tie_seed: int | None = None) -> Choice:
    """``prefix`` mode: ``student_topk[key]`` is the student's top-K ids [L, K] along candidate ``key`` under its
    own prefix, for the members of `Pool.contested` (none when the deciding group has one member)."""
    overlaps = {}
    for key, topk in student_topk.items():
        ids = torch.as_tensor(pool.candidate(key).token_ids, dtype=torch.long)
        valid = torch.ones(1, ids.numel(), dtype=torch.bool)
        overlaps[key] = float(overlap_scores(ids.unsqueeze(0), topk[: ids.numel()], valid)[0])
    return _choice(pool, overlaps, tier3, tie_seed)


def choose_position(pool: Pool, rollout_topk: Sequence[torch.Tensor], tier3: Tier3Policy,
                    tie_seed: int | None = None) -> list[Choice]:
    """``position`` mode (the reference's): one choice per rollout row of the prompt; ``rollout_topk[r]`` is the
    student's top-K ids [R_r, K] along its rollout r (row t = response index t). Every member of the deciding
    group is scored, also a lone one (the metrics then report its overlap)."""
    _, group = pool.group(tier3)
    if not group or not rollout_topk:
        return [_choice(pool, {}, tier3, tie_seed) for _ in rollout_topk]
    cands = [pool.candidate(key) for key in group]
    length = max(len(c.token_ids) for c in cands)
    ids = torch.full((len(cands), length), PAD_ID, dtype=torch.long)
    for j, c in enumerate(cands):
        ids[j, : len(c.token_ids)] = torch.as_tensor(c.token_ids, dtype=torch.long)
    rows = max(int(t.shape[0]) for t in rollout_topk)
    k = int(rollout_topk[0].shape[1])
    stacked = torch.full((len(rollout_topk), rows, k), PAD_ID, dtype=torch.long)
    for r, t in enumerate(rollout_topk):
        stacked[r, : t.shape[0]] = t
    matrix = position_overlap_matrix(ids, [len(c.token_ids) for c in cands], stacked,
                                     [int(t.shape[0]) for t in rollout_topk])
    return [_choice(pool, dict(zip(group, matrix[r].tolist())), tier3, tie_seed) for r in range(len(rollout_topk))]
