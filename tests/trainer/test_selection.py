"""BRTS selection: the overlap score in both modes, every branch of the priority rule (also against a brute-force
reading of it), and the choice per prompt / per rollout row on candidate records."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from brts.shared.config import ConfigError, TrainConfig
from brts.trainer.microbatch import response_positions
from brts.trainer.selection import (
    Pool,
    choose_position,
    choose_prefix,
    deciding_group,
    overlap_scores,
    position_mode_topk,
    position_overlap_matrix,
    select_candidate,
    topk_overlap,
    valid_mask_from_lengths,
    valid_rows,
)
from brts.trainer.topk_logprobs import chunked_topk_logprobs

L = torch.tensor  # short alias for constructed LongTensors


def _overlap(cand: torch.Tensor, topk: torch.Tensor, valid: torch.Tensor) -> float:
    """One candidate's overlap through the batched production function."""
    return float(overlap_scores(cand.unsqueeze(0), topk, valid.unsqueeze(0))[0])


def _brute_overlap(cand: list[int], topk: list[list[int]], valid: list[bool]) -> float:
    n = sum(valid)
    hits = sum(1 for t, v in enumerate(valid) if v and cand[t] != -1 and cand[t] in [i for i in topk[t] if i != -1])
    return hits / n if n else 0.0


# ---------------------------------------------------------------------------------------------
# overlap_scores
# ---------------------------------------------------------------------------------------------


def test_overlap_score_constructed() -> None:
    cand = L([5, 7, 9, 2, 0])
    topk = L([[5, 1], [3, 4], [9, 7], [2, -1], [0, 6]])
    valid = torch.tensor([True, True, True, True, False])
    # hits at t=0 (5), t=2 (9), t=3 (2); t=1 misses; t=4 is not valid
    assert _overlap(cand, topk, valid) == 3 / 4


def test_padding_id_never_matches() -> None:
    cand = L([-1, 4])
    topk = L([[-1, -1], [-1, 4]])
    valid = torch.tensor([True, True])
    assert _overlap(cand, topk, valid) == 1 / 2


def test_no_valid_position_gives_zero() -> None:
    cand = L([1, 2])
    topk = L([[1], [2]])
    assert _overlap(cand, topk, torch.zeros(2, dtype=torch.bool)) == 0.0
    assert (
        _overlap(L([], dtype=torch.long), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.bool)) == 0.0
    )


def test_empty_topk_gives_zero() -> None:
    """K = 0 (no student top-K): every sim is 0, as in the reference (TS:87-88)."""
    assert _overlap(L([1, 2]), torch.zeros(2, 0, dtype=torch.long), torch.ones(2, dtype=torch.bool)) == 0.0


def test_overlap_scores_batched_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    c, length, k, vocab = 6, 11, 3, 8
    cand = torch.randint(0, vocab, (c, length), generator=g)
    topk = torch.randint(-1, vocab, (c, length, k), generator=g)
    lengths = torch.randint(0, length + 1, (c,), generator=g)
    lengths[0] = 0
    valid = valid_mask_from_lengths(lengths, length)
    scores = overlap_scores(cand, topk, valid)
    assert scores.shape == (c,)
    for i in range(c):
        ref = _brute_overlap(cand[i].tolist(), topk[i].tolist(), valid[i].tolist())
        assert scores[i].item() == ref
    assert scores[0].item() == 0.0
    # a top-K shared by all candidates broadcasts
    shared = overlap_scores(cand, topk[2], valid)
    for i in range(c):
        assert shared[i].item() == _brute_overlap(cand[i].tolist(), topk[2].tolist(), valid[i].tolist())


def test_overlap_shape_errors() -> None:
    with pytest.raises(ValueError, match="valid"):
        overlap_scores(L([[1, 2]]), L([[1], [2]]), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="student_topk_ids"):
        overlap_scores(L([[1, 2]]), L([[1], [2], [3]]), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="candidate_ids"):
        overlap_scores(L([1, 2]), L([[1], [2]]), torch.ones(2, dtype=torch.bool))


def test_valid_mask_keeps_eos_even_when_pad_equals_eos() -> None:
    eos = pad = 2
    cand = L([5, 7, eos, pad, pad])  # real length 3, EOS included
    valid = valid_mask_from_lengths([3], 5)[0]
    assert valid.tolist() == [True, True, True, False, False]
    topk = L([[5], [1], [eos], [pad], [pad]])
    # the EOS hit counts; the padding after it does not (a `cand != pad` mask would give 1/2)
    assert _overlap(cand, topk, valid) == 2 / 3
    with pytest.raises(ValueError, match="lengths"):
        valid_mask_from_lengths([6], 5)


# ---------------------------------------------------------------------------------------------
# the two overlap modes
# ---------------------------------------------------------------------------------------------


def test_position_mode_topk_pads_truncates_and_masks_beyond_rollout() -> None:
    rollout = L([[1, 2], [3, 4], [5, 6], [0, 0]])  # last row: a padding position of the rollout
    out = position_mode_topk(rollout, 6, rollout_length=3)
    assert out.tolist() == [[1, 2], [3, 4], [5, 6], [-1, -1], [-1, -1], [-1, -1]]
    assert position_mode_topk(rollout, 2).tolist() == [[1, 2], [3, 4]]
    assert position_mode_topk(rollout, 5).tolist()[3:] == [[0, 0], [-1, -1]]
    with pytest.raises(ValueError, match="rollout_length"):
        position_mode_topk(rollout, 3, rollout_length=5)


def test_position_mode_overlap_penalises_tokens_beyond_the_rollout() -> None:
    """§3.3: index-aligned against the rollout's own top-K; beyond its length, every token misses
    (even id 0, which the reference's zero-filled rows would have matched)."""
    rollout_topk = L([[[4, 9], [8, 1], [0, 3], [0, 0], [0, 0]]])  # one rollout, real length 3
    cand = L([[4, 1, 7, 0, 0], [9, 8, 3, 2, -1]])
    lengths = [5, 4]
    sims = position_overlap_matrix(cand, lengths, rollout_topk, [3])
    # cand 0: hits t=0 (4), t=1 (1); t=2 (7) misses; t=3, t=4 beyond the rollout miss -> 2/5
    # cand 1 (length 4): hits t=0 (9), t=1 (8), t=2 (3); t=3 is beyond the rollout -> 3/4
    assert sims.tolist() == [[2 / 5, 3 / 4]]


def _cand(tier: int, correct: bool, ids: list[int]) -> SimpleNamespace:
    """A candidate record as the client delivers it (the fields selection reads)."""
    return SimpleNamespace(tier=tier, correct=correct, token_ids=np.array(ids, dtype=np.int32))


def test_position_mode_selects_per_rollout_row() -> None:
    """With n > 1 rollouts per prompt, each row gets its own choice from the shared pool."""
    cand = L([[1, 1, 1], [2, 2, 2]])
    rollout_topk = L([[[1], [1], [1]], [[2], [2], [9]]])
    sims = position_overlap_matrix(cand, [3, 3], rollout_topk, [3, 3])
    assert sims.tolist() == [[1.0, 0.0], [0.0, 2 / 3]]
    pool = Pool.of([_cand(1, True, [1, 1, 1]), _cand(1, True, [2, 2, 2])])
    rows = [rollout_topk[0], rollout_topk[1]]
    assert [ch.candidate for ch in choose_position(pool, rows, "most_similar")] == [pool.tier1[0], pool.tier1[1]]
    # correctness is per candidate: only candidate 0 correct -> both rows take it
    pool = Pool.of([_cand(1, True, [1, 1, 1]), _cand(1, False, [2, 2, 2])])
    assert [ch.candidate for ch in choose_position(pool, rows, "most_similar")] == [pool.tier1[0]] * 2


def test_position_choice_is_per_rollout_row() -> None:
    pool = Pool.of([_cand(1, True, [5, 6, 7]), _cand(1, True, [8, 9, 9])])
    rows = [torch.tensor([[5, 0], [6, 0], [7, 0]]), torch.tensor([[8, 1], [9, 1]])]
    first, second = choose_position(pool, rows, "most_similar")
    assert first.candidate is pool.tier1[0] and first.overlap == 1.0 and first.others == [0.0]
    assert second.candidate is pool.tier1[1] and second.overlap == pytest.approx(2 / 3)


def test_prefix_mode_end_to_end_with_a_toy_student() -> None:
    """A toy student (it ignores the prefix) whose top-1 at each position is the next token of A.

    Candidate A gets overlap 1; a candidate that agrees with the student at half its positions gets
    1/2. Exercises the real chunked top-K path and the prompt/response off-by-one together."""
    vocab, prompt = 12, [3, 4]
    cand_a = [5, 6, 7, 1]  # 1 = EOS
    cand_b = [5, 9, 7, 2]
    # the toy 'model': hidden state at position s is 10 * onehot(token predicted next for A)
    seq_a = prompt + cand_a
    hidden = torch.zeros(2, len(seq_a), vocab)
    for s in range(len(seq_a) - 1):
        hidden[:, s, seq_a[s + 1]] = 10.0
    rows = hidden[:, response_positions(len(prompt), len(seq_a))]  # [2, 4, V]: row t predicts candidate token t
    cand_topk = chunked_topk_logprobs(rows, torch.eye(vocab), k=1, chunk_size=3).topk_ids  # [2, 4, 1]
    cand = L([cand_a, cand_b])
    valid = valid_mask_from_lengths([4, 4], 4)
    assert overlap_scores(cand, cand_topk, valid).tolist() == [1.0, 0.5]


# ---------------------------------------------------------------------------------------------
# the priority rule
# ---------------------------------------------------------------------------------------------


def _select(tier1: list[tuple[bool, float]], tier2: list[tuple[bool, float]],
            tier3: str = "most_similar") -> tuple[int, int] | None:
    """`select_candidate` on ``(correct, overlap)`` pairs, answering ``(tier, index within the pool's tier)``."""
    overlaps = {(1, i): o for i, (_, o) in enumerate(tier1)} | {(2, i): o for i, (_, o) in enumerate(tier2)}
    got = select_candidate([c for c, _ in tier1], [c for c, _ in tier2], overlaps, tier3)  # type: ignore[arg-type]
    return None if got is None else (got[0], got[1][1])


def _brute_rule(tier1: list[tuple[bool, float]], tier2: list[tuple[bool, float]], tier3: str) -> tuple[int, int] | None:
    """The rule read off brts-reference §3.4/§5 literally: sort each eligible list by (-overlap, index), take the
    head of the first non-empty one."""
    if not tier1:
        return None
    for tier, eligible in ((1, [(i, o) for i, (c, o) in enumerate(tier1) if c]),
                           (2, [(i, o) for i, (c, o) in enumerate(tier2) if c]),
                           (3, [] if tier3 == "skip" else list(enumerate(o for _, o in tier1)))):
        if eligible:
            return tier, sorted(eligible, key=lambda e: (-e[1], e[0]))[0][0]
    return None


@pytest.mark.parametrize("seed", range(10))
def test_priority_rule_matches_brute_force(seed: int) -> None:
    """Random pools with many ties (overlaps from a 3-value set): `select_candidate` equals the literal rule, and
    its winner is always a member of `deciding_group` (which is empty exactly when there is no choice)."""
    rng = random.Random(seed)
    for _ in range(200):
        tier1 = [(rng.random() < 0.3, rng.choice([0.0, 0.5, 1.0])) for _ in range(rng.randint(0, 4))]
        tier2 = [(rng.random() < 0.3, rng.choice([0.0, 0.5, 1.0])) for _ in range(rng.randint(0, 2))]
        for tier3 in ("most_similar", "skip"):
            want = _brute_rule(tier1, tier2, tier3)
            assert _select(tier1, tier2, tier3) == want
            tier, group = deciding_group([c for c, _ in tier1], [c for c, _ in tier2], tier3)  # type: ignore[arg-type]
            assert (tier is None) == (want is None) == (group == [])
            if want is not None:
                assert tier == want[0] and (2 if tier == 2 else 1, want[1]) in group


def test_tier1_correct_with_highest_overlap_wins() -> None:
    tier1 = [(True, 0.2), (False, 0.9), (True, 0.5), (True, 0.1)]
    assert _select(tier1, [(True, 1.0)]) == (1, 2)


def test_tier1_correct_with_zero_overlap_beats_incorrect_ones() -> None:
    assert _select([(False, 1.0), (True, 0.0)], []) == (1, 1)


def test_ties_go_to_the_lowest_index() -> None:
    assert _select([(False, 0.9), (True, 0.5), (True, 0.5)], []) == (1, 1)
    assert _select([(False, 0.1)], [(False, 0.9), (True, 0.3), (True, 0.3)]) == (2, 1)
    assert _select([(False, 0.4), (False, 0.7), (False, 0.7)], [(False, 1.0)]) == (3, 1)
    # equal fractions from different counts compare equal (1/3 vs 2/6)
    a = _overlap(L([1, 0, 0]), L([[1], [2], [2]]), torch.ones(3, dtype=torch.bool))
    b = _overlap(L([1, 1, 0, 0, 0, 0]), L([[1]] * 2 + [[2]] * 4), torch.ones(6, dtype=torch.bool))
    assert _select([(True, b), (True, a)], []) == (1, 0)
    assert _select([(True, a), (True, b)], []) == (1, 0)


def test_tier2_when_no_tier1_is_correct() -> None:
    tier1 = [(False, 0.9), (False, 0.8)]
    assert _select(tier1, [(False, 1.0), (True, 0.2), (True, 0.6)]) == (2, 2)


def test_tier3_most_similar_ignores_correctness_and_tier2() -> None:
    tier1 = [(False, 0.3), (False, 0.8), (False, 0.5)]
    assert _select(tier1, [(False, 1.0)]) == (3, 1)
    assert _select(tier1, []) == (3, 1)
    assert _select(tier1, [], tier3="most_similar") == (3, 1)


def test_tier3_skip() -> None:
    tier1 = [(False, 0.3), (False, 0.8)]
    assert _select(tier1, [(False, 1.0)], tier3="skip") is None
    assert _select(tier1, [], tier3="skip") is None
    # skip only affects Tier 3
    assert _select([(True, 0.1), (False, 0.9)], [], tier3="skip") == (1, 0)
    assert _select(tier1, [(True, 0.0)], tier3="skip") == (2, 0)


def test_empty_tiers() -> None:
    assert _select([], []) is None
    assert _select([], [(True, 1.0)]) is None  # no Tier-1 pool: no teacher branch, also no deciding group
    assert deciding_group([], [True], "most_similar") == (None, [])
    assert _select([(False, 0.0)], []) == (3, 0)


def test_a_lone_member_wins_without_an_overlap() -> None:
    assert select_candidate([False, True], [], {}, "most_similar") == (1, (1, 1))
    assert select_candidate([False], [True], {}, "skip") == (2, (2, 0))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match=r"overlap of candidate \(1, 0\)"):
        _select([(True, float("nan")), (True, 0.1)], [])
    with pytest.raises(ValueError, match=r"overlap of candidate \(2, 1\)"):
        _select([(False, 0.1)], [(True, 0.2), (True, float("nan"))])
    with pytest.raises(ValueError, match=r"overlap of candidate \(1, 1\)"):
        select_candidate([True, True], [], {(1, 0): 0.5}, "most_similar")  # a contested member left unscored
    with pytest.raises(ValueError, match="tier3"):
        _select([(True, 0.1)], [], tier3="random")


def test_the_config_layer_validates_the_selection_knobs() -> None:
    cfg = TrainConfig(student="s")
    assert (cfg.overlap_mode, cfg.tier3) == ("prefix", "most_similar")
    assert TrainConfig(student="s", overlap_mode="position", tier3="skip").tier3 == "skip"
    with pytest.raises(ConfigError, match="train.overlap_mode"):
        TrainConfig(student="s", overlap_mode="suffix")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="train.tier3"):
        TrainConfig(student="s", tier3="never")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# the choice on candidate records
# ---------------------------------------------------------------------------------------------


def test_deciding_group_is_where_overlap_can_still_matter() -> None:
    pool = Pool.of([_cand(1, False, [1]), _cand(1, True, [2]), _cand(2, True, [3]), _cand(1, True, [4])])
    assert pool.group("most_similar") == (1, [(1, 1), (1, 2)])
    assert pool.contested("most_similar") == [(1, 1), (1, 2)]
    pool = Pool.of([_cand(1, False, [1]), _cand(2, False, [2]), _cand(2, True, [3])])
    assert pool.group("most_similar") == (2, [(2, 1)])
    assert pool.contested("most_similar") == []  # one member: correctness alone decides, no forward needed
    pool = Pool.of([_cand(1, False, [1]), _cand(1, False, [2])])
    assert pool.group("most_similar") == (3, [(1, 0), (1, 1)])
    assert pool.group("skip") == (None, []) and pool.contested("skip") == []


@pytest.mark.parametrize("seed", range(20))
def test_prefix_choice_on_the_deciding_group_equals_scoring_every_candidate(seed: int) -> None:
    """The loop scores `Pool.contested` only; the choice equals the literal rule over every candidate's overlap."""
    gen = torch.Generator().manual_seed(seed)
    cands = [_cand(1 if i < 4 else 2, bool(torch.rand(1, generator=gen) < 0.4),
                   torch.randint(0, 6, (5,), generator=gen).tolist()) for i in range(6)]
    pool = Pool.of(cands)
    topk = {(t, i): torch.randint(0, 6, (5, 2), generator=gen)
            for t, tier in ((1, pool.tier1), (2, pool.tier2)) for i in range(len(tier))}

    def overlap(key: tuple[int, int]) -> float:
        ids = torch.as_tensor(pool.candidate(key).token_ids, dtype=torch.long)
        return float((ids.unsqueeze(-1) == topk[key]).any(-1).double().mean())

    for tier3 in ("most_similar", "skip"):
        expected = _brute_rule([(c.correct, overlap((1, i))) for i, c in enumerate(pool.tier1)],
                               [(c.correct, overlap((2, i))) for i, c in enumerate(pool.tier2)], tier3)
        got = choose_prefix(pool, {k: topk[k] for k in pool.contested(tier3)}, tier3)  # type: ignore[arg-type]
        if expected is None:
            assert got.tier is None and got.candidate is None
        else:
            tier, index = expected
            assert got.tier == tier
            assert got.candidate is (pool.tier2 if tier == 2 else pool.tier1)[index]


def test_topk_overlap_matches_brute_force_and_truncation_mask() -> None:
    assert topk_overlap(np.array([[1, 2], [3, 4]]), np.array([[2, 9], [-1, -1]])) == pytest.approx(0.25)
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randint(-1, 6, (7, 3), generator=g), torch.randint(-1, 6, (5, 4), generator=g)
    brute = [sum(1 for s in student[r].tolist() if s != -1 and s in teacher[r].tolist()) / 3 for r in range(5)]
    assert topk_overlap(student.numpy(), teacher) == pytest.approx(sum(brute) / 5, abs=1e-12)
    assert valid_rows(5, None).tolist() == [True] * 5
    assert valid_rows(5, 2).tolist() == [True, True, False, False, False]
