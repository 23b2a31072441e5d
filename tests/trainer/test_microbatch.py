"""The student's micro-batches: the row/token alignment against a plain model forward, the collate's padding, and
the greedy length plan against its definition (brts.trainer.microbatch)."""

from __future__ import annotations

import random

import pytest
import torch

from brts.trainer.microbatch import (
    DUMMY_RESPONSE_START,
    DUMMY_TOKENS,
    all_reduce_max,
    all_reduce_sum,
    check_response_start,
    collate,
    lockstep_plan,
    plan_by_length,
    response_positions,
)

CPU = torch.device("cpu")


def test_response_token_t_is_predicted_at_position_start_minus_one_plus_t() -> None:
    assert response_positions(3, 8).tolist() == [2, 3, 4, 5, 6]  # S - P = 5 rows; position S - 1 = 7 is never read
    assert response_positions(1, 2).tolist() == [0]
    assert response_positions(DUMMY_RESPONSE_START, len(DUMMY_TOKENS)).numel() == 1
    for bad in (0, 8, 9):
        with pytest.raises(ValueError, match=r"response_start: must be in 1\.\.7"):
            response_positions(bad, 8)
    with pytest.raises(ValueError, match=r"response_starts\[4\]"):
        check_response_start(0, 5, "response_starts[4]")


def test_collate_pads_right_and_points_every_row_at_its_position() -> None:
    seqs = [(5, 6, 7, 8), torch.tensor([9, 10, 11, 12, 13, 14]), [15, 16]]
    starts = [2, 5, 1]
    input_ids, attention, positions = collate(seqs, starts, CPU)
    assert input_ids.tolist() == [[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14], [15, 16, 0, 0, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]]
    assert positions.tolist() == [[1, 2], [4, 0], [0, 0]]  # rows beyond a sequence's response: position 0
    assert all(t.dtype == torch.long for t in (input_ids, attention, positions))


@pytest.mark.parametrize("budget", [8, 64])
def test_rows_of_a_padded_micro_batch_are_the_plain_forward_of_each_response_token(tiny_qwen2_factory,
                                                                                  budget: int) -> None:
    """Brute force: for every sequence, collate it with others of other lengths, gather the student's log-prob of
    each actual response token at its row, and compare with that token's log-prob in an unpadded forward of the
    sequence alone (logits at position P - 1 + t, token x_{P+t})."""
    from brts.trainer.fsdp import StudentLogProbs

    model = tiny_qwen2_factory(vocab_size=50, hidden_size=32)
    wrapper = StudentLogProbs(model, chunk_size=3)
    rng = random.Random(0)
    seqs = [[rng.randrange(50) for _ in range(rng.randint(2, 12))] for _ in range(7)]
    starts = [rng.randint(1, len(s) - 1) for s in seqs]
    for batch in plan_by_length([len(s) for s in seqs], budget):
        input_ids, attention, positions = collate([seqs[i] for i in batch], [starts[i] for i in batch], CPU)
        targets = torch.full((len(batch), positions.shape[1], 1), -1, dtype=torch.long)
        for b, i in enumerate(batch):
            targets[b, : len(seqs[i]) - starts[i], 0] = torch.tensor(seqs[i][starts[i]:])
        with torch.no_grad():
            got = wrapper(input_ids, attention, positions, targets)[..., 0]
        for b, i in enumerate(batch):
            seq, start = seqs[i], starts[i]
            with torch.no_grad():
                logp = model(torch.tensor([seq])).logits[0].float().log_softmax(-1)
            want = torch.stack([logp[start - 1 + t, seq[start + t]] for t in range(len(seq) - start)])
            torch.testing.assert_close(got[b, : len(seq) - start], want, atol=1e-5, rtol=0)
            assert torch.isneginf(got[b, len(seq) - start:]).all()  # padding rows gather id -1


@pytest.mark.parametrize("seed", range(5))
def test_plan_by_length_is_the_greedy_in_order_plan(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(0, 12))]
        budget = rng.randint(1, 120)
        plan = plan_by_length(lengths, budget)
        assert [i for batch in plan for i in batch] == list(range(len(lengths)))  # a partition, in order
        for j, batch in enumerate(plan):
            cost = len(batch) * max(lengths[i] for i in batch)
            assert len(batch) == 1 or cost <= budget  # within budget unless one sequence is over it alone
            if j + 1 < len(plan):  # and greedy: the next sequence would not have fitted
                grown = [*batch, plan[j + 1][0]]
                assert len(grown) * max(lengths[i] for i in grown) > budget


def test_without_a_process_group_the_reductions_are_the_local_values() -> None:
    assert all_reduce_sum([1.5, 2.0], CPU) == [1.5, 2.0]
    assert all_reduce_max(3, CPU) == 3
    assert lockstep_plan([5, 5, 5], 10, CPU) == plan_by_length([5, 5, 5], 10) == [[0, 1], [2]]
    assert lockstep_plan([], 10, CPU) == []
