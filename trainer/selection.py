"""BRTS teacher-candidate selection: the overlap score and the three-tier priority rule.

Pure functions, no I/O. The trainer computes the student's top-K ids (see
`brts.trainer.topk_logprobs`), turns them into an overlap score per candidate here, and picks one
candidate per prompt (or per rollout row) with `select_candidate`.

Overlap score (brts-reference §3.3)
-----------------------------------
For a candidate with token ids z_0..z_{L-1}, a set of valid positions V and the student's top-K ids
S_t at each position t:

    overlap = |{ t in V : z_t in S_t }| / |V|        (0.0 when V is empty)

Padding id -1 in S_t never matches. Two modes decide where S_t comes from (`OverlapMode`):

* ``prefix`` (our default, the paper's intent; brts-reference §15 "intended"): S_t is the student's
  top-K predicting z_t given the **candidate's own prefix**, i.e. a no-grad student forward on
  (original prompt, z). Row t of that forward's response part is what `prefix_mode_topk` slices
  out. The score is then a likelihood-like "would the live student have proposed this token here".
  The overlap does not depend on which student rollout of the prompt we look at, so one selection
  per prompt serves all n rollout rows.
* ``position`` (the reference code's, §3.3): S_t is the student's top-K at response index t of the
  student's **own rollout**, computed under a different prefix. Beyond the rollout's length the
  reference has zero-filled rows (id 0, §3.3); we pad with -1 instead, so such positions are plain
  misses (the reference would count a token 0 there as a hit; a deliberate, harmless deviation).
  Because S_t depends on the rollout, with n > 1 rollouts per prompt the selection is made per
  rollout row (`position_overlap_matrix` + `select_for_rows`), as the reference does (§2 step 1).

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

Ties go to the lowest index (the reference's first-max argmax). Tier-2 candidates are never used in
Tier 3, as in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

OverlapMode = Literal["prefix", "position"]
Tier3Policy = Literal["most_similar", "skip"]

OVERLAP_MODES: tuple[str, ...] = get_args(OverlapMode)
TIER3_POLICIES: tuple[str, ...] = get_args(Tier3Policy)

#: Padding id in top-K id arrays (design.md §3: "a missing entry is id -1"). It never matches.
PAD_ID: int = -1


@dataclass(frozen=True)
class SelectionConfig:
    """The two selection knobs; validates itself so a bad YAML value fails with a clear message."""

    overlap_mode: OverlapMode = "prefix"
    tier3: Tier3Policy = "most_similar"

    def __post_init__(self) -> None:
        check_overlap_mode(self.overlap_mode)
        check_tier3_policy(self.tier3)


def check_overlap_mode(mode: str) -> OverlapMode:
    """Return `mode` if it is a known overlap mode, else raise ValueError naming `overlap_mode`."""
    if mode not in OVERLAP_MODES:
        raise ValueError(f"overlap_mode must be one of {OVERLAP_MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def check_tier3_policy(policy: str) -> Tier3Policy:
    """Return `policy` if it is a known Tier-3 policy, else raise ValueError naming `tier3`."""
    if policy not in TIER3_POLICIES:
        raise ValueError(f"tier3 must be one of {TIER3_POLICIES}, got {policy!r}")
    return policy  # type: ignore[return-value]


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


def prefix_mode_topk(sequence_topk: torch.Tensor, response_start: int, length: int) -> torch.Tensor:
    """Student top-K for the ``prefix`` mode, sliced from a forward on (prompt, candidate).

    `sequence_topk` is LongTensor[..., S, K]: the student's top-K at every position of the full
    sequence prompt + candidate, where row s holds the prediction made at position s, i.e. for
    token s + 1. The candidate's token t sits at position ``response_start + t``, so its prediction
    is row ``response_start - 1 + t``. Returns LongTensor[..., length, K], padded with -1 where the
    sequence is too short. The off-by-one lives here so that no caller has to get it right again.
    """
    if sequence_topk.dim() < 2:
        raise ValueError(f"sequence_topk must be [..., S, K], got shape {tuple(sequence_topk.shape)}")
    if response_start < 1:
        raise ValueError(f"response_start must be >= 1 (a prompt of at least one token), got {response_start}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    *lead, seq_len, k = sequence_topk.shape
    out = torch.full((*lead, length, k), PAD_ID, dtype=torch.long, device=sequence_topk.device)
    first = response_start - 1
    n = max(0, min(length, seq_len - first))
    out[..., :n, :] = sequence_topk[..., first : first + n, :]
    return out


# --------------------------------------------------------------------------------------------------
# overlap scores
# --------------------------------------------------------------------------------------------------


def _hits(candidate_ids: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Bool [..., L]: candidate token t is among the (non-padding) top-K ids at t."""
    eq = (candidate_ids.unsqueeze(-1) == topk_ids) & (topk_ids != PAD_ID)
    return eq.any(dim=-1)


def overlap_score(candidate_ids: torch.Tensor, student_topk_ids: torch.Tensor, valid: torch.Tensor) -> float:
    """Fraction of valid positions whose candidate token is in the student's top-K there (§3.3).

    `candidate_ids` LongTensor[L], `student_topk_ids` LongTensor[L, K] (-1 never matches),
    `valid` BoolTensor[L]. Returns 0.0 when no position is valid (the reference's rule, TS:101-105).
    """
    if candidate_ids.dim() != 1:
        raise ValueError(f"candidate_ids must be [L], got shape {tuple(candidate_ids.shape)}")
    scores = overlap_scores(candidate_ids.unsqueeze(0), student_topk_ids, valid.unsqueeze(0))
    return float(scores[0].item())


def overlap_scores(candidate_ids: torch.Tensor, student_topk_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Batched `overlap_score`: FloatTensor[C] (float64, so equal fractions compare equal).

    `candidate_ids` LongTensor[C, L] (padded), `student_topk_ids` LongTensor[C, L, K] or [L, K]
    (shared by all candidates), `valid` BoolTensor[C, L].
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
    selection is made (`select_for_rows`).
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


# --------------------------------------------------------------------------------------------------
# the priority rule
# --------------------------------------------------------------------------------------------------


def _checked(tier: Sequence[tuple[bool, float]], name: str) -> list[tuple[bool, float]]:
    out: list[tuple[bool, float]] = []
    for i, entry in enumerate(tier):
        if len(entry) != 2:
            raise ValueError(f"{name}[{i}] must be a (correct, overlap) pair, got {entry!r}")
        correct, overlap = entry
        overlap_f = float(overlap)
        if not math.isfinite(overlap_f):
            raise ValueError(f"{name}[{i}] has a non-finite overlap {overlap_f}")
        out.append((bool(correct), overlap_f))
    return out


def _argmax_first(entries: list[tuple[bool, float]], only_correct: bool) -> int | None:
    """Index of the highest overlap (first one on ties), among correct entries if `only_correct`."""
    best: int | None = None
    for i, (correct, overlap) in enumerate(entries):
        if only_correct and not correct:
            continue
        if best is None or overlap > entries[best][1]:
            best = i
    return best


def select_candidate(
    tier1: Sequence[tuple[bool, float]],
    tier2: Sequence[tuple[bool, float]],
    tier3: Tier3Policy = "most_similar",
) -> tuple[int, int] | None:
    """Pick the teacher trajectory by the BRTS priority rule (brts-reference §3.4, §4.3, §5).

    `tier1`, `tier2`: one ``(correct, overlap)`` per candidate. Returns ``(tier, index)`` into that
    tier's list: ``(1, i)`` the correct Tier-1 candidate with the highest overlap, else ``(2, j)`` the
    correct Tier-2 candidate with the highest overlap, else ``(3, i)`` the Tier-1 candidate with the
    highest overlap regardless of correctness. Ties go to the lowest index. Returns None when `tier1`
    is empty (no teacher pool: the prompt has no teacher branch) or when Tier 3 is reached with
    ``tier3="skip"``. A non-finite overlap is a caller bug and raises ValueError.
    """
    check_tier3_policy(tier3)
    t1 = _checked(tier1, "tier1")
    t2 = _checked(tier2, "tier2")
    if not t1:
        return None
    best1 = _argmax_first(t1, only_correct=True)
    if best1 is not None:
        return (1, best1)
    best2 = _argmax_first(t2, only_correct=True)
    if best2 is not None:
        return (2, best2)
    if tier3 == "skip":
        return None
    best3 = _argmax_first(t1, only_correct=False)
    assert best3 is not None  # t1 is non-empty
    return (3, best3)


def select_for_rows(
    tier1_correct: Sequence[bool],
    tier1_overlaps: torch.Tensor,
    tier2_correct: Sequence[bool],
    tier2_overlaps: torch.Tensor,
    tier3: Tier3Policy = "most_similar",
) -> list[tuple[int, int] | None]:
    """`select_candidate` for each of N rollout rows sharing one candidate pool.

    Correctness is a property of the candidate (one flag per candidate); the overlap depends on the
    row in ``position`` mode, hence `tier1_overlaps` FloatTensor[N, C1] and `tier2_overlaps`
    FloatTensor[N, C2] (from `position_overlap_matrix`). In ``prefix`` mode all rows are equal and a
    single `select_candidate` call suffices.
    """
    c1, c2 = len(tier1_correct), len(tier2_correct)
    if tier1_overlaps.dim() != 2 or tier1_overlaps.shape[1] != c1:
        raise ValueError(f"tier1_overlaps must be [N, {c1}], got shape {tuple(tier1_overlaps.shape)}")
    n = tier1_overlaps.shape[0]
    if tier2_overlaps.shape != (n, c2):
        raise ValueError(f"tier2_overlaps must be [{n}, {c2}], got shape {tuple(tier2_overlaps.shape)}")
    out: list[tuple[int, int] | None] = []
    for row in range(n):
        t1 = list(zip(tier1_correct, tier1_overlaps[row].tolist(), strict=True))
        t2 = list(zip(tier2_correct, tier2_overlaps[row].tolist(), strict=True))
        out.append(select_candidate(t1, t2, tier3))
    return out
