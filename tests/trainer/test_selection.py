"""BRTS selection: the overlap score in both modes and every branch of the priority rule."""

from __future__ import annotations

import pytest
import torch

from brts.trainer.selection import (
    SelectionConfig,
    overlap_score,
    overlap_scores,
    position_mode_topk,
    position_overlap_matrix,
    prefix_mode_topk,
    select_candidate,
    select_for_rows,
    valid_mask_from_lengths,
)
from brts.trainer.topk_logprobs import chunked_topk_logprobs

L = torch.tensor  # short alias for constructed LongTensors


def _brute_overlap(cand: list[int], topk: list[list[int]], valid: list[bool]) -> float:
    n = sum(valid)
    hits = sum(1 for t, v in enumerate(valid) if v and cand[t] != -1 and cand[t] in [i for i in topk[t] if i != -1])
    return hits / n if n else 0.0


# ---------------------------------------------------------------------------------------------
# overlap_score / overlap_scores
# ---------------------------------------------------------------------------------------------


def test_overlap_score_constructed() -> None:
    cand = L([5, 7, 9, 2, 0])
    topk = L([[5, 1], [3, 4], [9, 7], [2, -1], [0, 6]])
    valid = torch.tensor([True, True, True, True, False])
    # hits at t=0 (5), t=2 (9), t=3 (2); t=1 misses; t=4 is not valid
    assert overlap_score(cand, topk, valid) == 3 / 4


def test_padding_id_never_matches() -> None:
    cand = L([-1, 4])
    topk = L([[-1, -1], [-1, 4]])
    valid = torch.tensor([True, True])
    assert overlap_score(cand, topk, valid) == 1 / 2


def test_no_valid_position_gives_zero() -> None:
    cand = L([1, 2])
    topk = L([[1], [2]])
    assert overlap_score(cand, topk, torch.zeros(2, dtype=torch.bool)) == 0.0
    assert overlap_score(L([], dtype=torch.long), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.bool)) == 0.0


def test_empty_topk_gives_zero() -> None:
    """K = 0 (no student top-K): every sim is 0, as in the reference (TS:87-88)."""
    assert overlap_score(L([1, 2]), torch.zeros(2, 0, dtype=torch.long), torch.ones(2, dtype=torch.bool)) == 0.0


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
        assert overlap_score(cand[i], topk[i], valid[i]) == ref
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
        overlap_score(L([[1, 2]]), L([[1], [2]]), torch.ones(2, dtype=torch.bool))


def test_valid_mask_keeps_eos_even_when_pad_equals_eos() -> None:
    eos = pad = 2
    cand = L([5, 7, eos, pad, pad])  # real length 3, EOS included
    valid = valid_mask_from_lengths([3], 5)[0]
    assert valid.tolist() == [True, True, True, False, False]
    topk = L([[5], [1], [eos], [pad], [pad]])
    # the EOS hit counts; the padding after it does not (a `cand != pad` mask would give 1/2)
    assert overlap_score(cand, topk, valid) == 2 / 3
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


def test_position_mode_selects_per_rollout_row() -> None:
    """With n > 1 rollouts per prompt, each row gets its own choice from the shared pool."""
    cand = L([[1, 1, 1], [2, 2, 2]])
    rollout_topk = L([[[1], [1], [1]], [[2], [2], [9]]])
    sims = position_overlap_matrix(cand, [3, 3], rollout_topk, [3, 3])
    assert sims.tolist() == [[1.0, 0.0], [0.0, 2 / 3]]
    rows = select_for_rows([True, True], sims, [], torch.zeros(2, 0, dtype=torch.float64))
    assert rows == [(1, 0), (1, 1)]
    # correctness is per candidate: only candidate 0 correct -> both rows take it
    assert select_for_rows([True, False], sims, [], torch.zeros(2, 0)) == [(1, 0), (1, 0)]


def test_prefix_mode_topk_alignment() -> None:
    """Row s of a forward on prompt + candidate predicts token s + 1: candidate token t <- row start-1+t."""
    seq_topk = torch.arange(7).unsqueeze(-1).repeat(1, 2) * 10  # row s holds [10 s, 10 s]
    out = prefix_mode_topk(seq_topk, response_start=3, length=5)
    assert out[:, 0].tolist() == [20, 30, 40, 50, 60]
    out = prefix_mode_topk(seq_topk, response_start=5, length=4)
    assert out[:, 0].tolist() == [40, 50, 60, -1]  # sequence too short -> padding
    batched = prefix_mode_topk(seq_topk.expand(3, 7, 2), response_start=3, length=2)
    assert batched.shape == (3, 2, 2) and batched[2, :, 0].tolist() == [20, 30]
    with pytest.raises(ValueError, match="response_start"):
        prefix_mode_topk(seq_topk, response_start=0, length=2)


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
    weight = torch.eye(vocab)
    topk_ids = chunked_topk_logprobs(hidden, weight, k=1, chunk_size=3).topk_ids  # [2, S, 1]
    cand_topk = prefix_mode_topk(topk_ids, response_start=len(prompt), length=4)
    cand = L([cand_a, cand_b])
    valid = valid_mask_from_lengths([4, 4], 4)
    assert overlap_scores(cand, cand_topk, valid).tolist() == [1.0, 0.5]


# ---------------------------------------------------------------------------------------------
# the priority rule
# ---------------------------------------------------------------------------------------------


def test_tier1_correct_with_highest_overlap_wins() -> None:
    tier1 = [(True, 0.2), (False, 0.9), (True, 0.5), (True, 0.1)]
    assert select_candidate(tier1, [(True, 1.0)]) == (1, 2)


def test_tier1_correct_with_zero_overlap_beats_incorrect_ones() -> None:
    assert select_candidate([(False, 1.0), (True, 0.0)], []) == (1, 1)


def test_ties_go_to_the_lowest_index() -> None:
    assert select_candidate([(False, 0.9), (True, 0.5), (True, 0.5)], []) == (1, 1)
    assert select_candidate([(False, 0.1)], [(False, 0.9), (True, 0.3), (True, 0.3)]) == (2, 1)
    assert select_candidate([(False, 0.4), (False, 0.7), (False, 0.7)], [(False, 1.0)]) == (3, 1)
    # equal fractions from different counts compare equal (1/3 vs 2/6)
    a = overlap_score(L([1, 0, 0]), L([[1], [2], [2]]), torch.ones(3, dtype=torch.bool))
    b = overlap_score(L([1, 1, 0, 0, 0, 0]), L([[1]] * 2 + [[2]] * 4), torch.ones(6, dtype=torch.bool))
    assert select_candidate([(True, b), (True, a)], []) == (1, 0)
    assert select_candidate([(True, a), (True, b)], []) == (1, 0)


def test_tier2_when_no_tier1_is_correct() -> None:
    tier1 = [(False, 0.9), (False, 0.8)]
    assert select_candidate(tier1, [(False, 1.0), (True, 0.2), (True, 0.6)]) == (2, 2)


def test_tier3_most_similar_ignores_correctness_and_tier2() -> None:
    tier1 = [(False, 0.3), (False, 0.8), (False, 0.5)]
    assert select_candidate(tier1, [(False, 1.0)]) == (3, 1)
    assert select_candidate(tier1, []) == (3, 1)
    assert select_candidate(tier1, [], tier3="most_similar") == (3, 1)


def test_tier3_skip() -> None:
    tier1 = [(False, 0.3), (False, 0.8)]
    assert select_candidate(tier1, [(False, 1.0)], tier3="skip") is None
    assert select_candidate(tier1, [], tier3="skip") is None
    # skip only affects Tier 3
    assert select_candidate([(True, 0.1), (False, 0.9)], [], tier3="skip") == (1, 0)
    assert select_candidate(tier1, [(True, 0.0)], tier3="skip") == (2, 0)


def test_empty_tiers() -> None:
    assert select_candidate([], []) is None
    assert select_candidate([], [(True, 1.0)]) is None
    assert select_candidate([(False, 0.0)], []) == (3, 0)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="tier1"):
        select_candidate([(True, float("nan"))], [])
    with pytest.raises(ValueError, match="tier2"):
        select_candidate([(False, 0.1)], [(True, float("nan"))])
    with pytest.raises(ValueError, match="tier1"):
        select_candidate([(True, 0.1, 3)], [])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="tier3"):
        select_candidate([(True, 0.1)], [], tier3="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tier2_overlaps"):
        select_for_rows([True], torch.zeros(2, 1), [True], torch.zeros(1, 1))


def test_selection_config_validates() -> None:
    cfg = SelectionConfig()
    assert (cfg.overlap_mode, cfg.tier3) == ("prefix", "most_similar")
    assert SelectionConfig(overlap_mode="position", tier3="skip").tier3 == "skip"
    with pytest.raises(ValueError, match="overlap_mode"):
        SelectionConfig(overlap_mode="suffix")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tier3"):
        SelectionConfig(tier3="never")  # type: ignore[arg-type]
