"""TorchScorer: exact against a plain transformers forward, chunked (never T×V logits), strict on inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from brts.shared.engines.base import ScoreItem, Scorer
from brts.shared.engines.scorer import TorchScorer


def reference_logprobs(model: Any, token_ids: tuple[int, ...], response_start: int) -> torch.Tensor:
    """What the scorer must equal: ``model(input_ids).logits`` → fp32 log-softmax, rows predicting the response."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[response_start - 1 : len(token_ids) - 1]


def random_items(
    rng: np.random.Generator, vocab: int, shapes: list[tuple[int, int]], n_cand: int = 6
) -> list[ScoreItem]:
    items = []
    for length, start in shapes:
        ids = tuple(int(x) for x in rng.integers(0, vocab, length))
        cand = rng.integers(0, vocab, (length - start, n_cand))
        cand[rng.random(cand.shape) < 0.2] = -1  # some "no candidate" slots
        cand[:, 0] = ids[start:]  # the actual next token is always asked for
        items.append(ScoreItem(ids, start, cand))
    return items


def check_against_reference(model: Any, items: list[ScoreItem], outputs: list[Any], k: int, atol: float) -> None:
    assert len(outputs) == len(items)
    for item, out in zip(items, outputs):
        ref = reference_logprobs(model, item.token_ids, item.response_start)
        rows = len(item.token_ids) - item.response_start
        assert out.topk.ids.shape == (rows, k) and out.topk.logprobs.dtype == np.float32
        ref_top, _ = torch.topk(ref, k, dim=-1)
        np.testing.assert_allclose(out.topk.logprobs, ref_top.numpy(), atol=atol, rtol=0)
        # the returned ids carry those log-probs in the reference (robust to ties in order)
        at_ids = torch.gather(ref, 1, torch.from_numpy(out.topk.ids.astype(np.int64))).numpy()
        np.testing.assert_allclose(out.topk.logprobs, at_ids, atol=atol, rtol=0)
        cand = item.candidate_ids
        assert out.candidate_logprobs is not None and out.candidate_logprobs.shape == cand.shape
        assert out.candidate_logprobs.dtype == np.float32
        expected = np.where(cand >= 0, torch.gather(ref, 1, torch.from_numpy(np.maximum(cand, 0))).numpy(), -np.inf)
        assert np.array_equal(np.isneginf(out.candidate_logprobs), cand < 0)
        np.testing.assert_allclose(out.candidate_logprobs[cand >= 0], expected[cand >= 0], atol=atol, rtol=0)


def test_matches_plain_forward_fp32_batched_and_chunked(tiny_qwen2: Any) -> None:
    # chunk 7 splits items across chunk boundaries; 200 padded tokens per forward forces several padded batches
    scorer = TorchScorer(tiny_qwen2, chunk_size=7, max_batch_tokens=200)
    assert isinstance(scorer, Scorer) and scorer.vocab_size == 1000
    items = random_items(np.random.default_rng(0), 1000, [(30, 5), (12, 1), (47, 46), (33, 10), (25, 24), (40, 3)])
    outputs = scorer.score(items, k=16)
    check_against_reference(tiny_qwen2, items, outputs, k=16, atol=1e-5)


def test_one_big_batch_equals_one_by_one(tiny_qwen2: Any) -> None:
    items = random_items(np.random.default_rng(1), 1000, [(20, 4), (9, 2), (31, 30)])
    together = TorchScorer(tiny_qwen2, max_batch_tokens=10_000).score(items, k=4)
    alone = [TorchScorer(tiny_qwen2).score([it], k=4)[0] for it in items]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.topk.logprobs, b.topk.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.candidate_logprobs, b.candidate_logprobs, atol=1e-5, rtol=0)


def test_full_vocabulary_normalisation_and_no_candidates(tiny_qwen2: Any) -> None:
    item = ScoreItem(tuple(range(3, 15)), 4)
    (out,) = TorchScorer(tiny_qwen2).score([item], k=1000)
    assert out.candidate_logprobs is None
    # k = V returns every id once per row, and the probabilities sum to one: normalised over the full vocabulary
    assert all(sorted(row) == list(range(1000)) for row in out.topk.ids.tolist())
    np.testing.assert_allclose(np.exp(out.topk.logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    assert (np.diff(out.topk.logprobs, axis=1) <= 0).all()


def test_vocab_beyond_tokenizer_and_bf16(tiny_qwen2_factory: Any) -> None:
    model = tiny_qwen2_factory(vocab_size=1100, dtype=torch.bfloat16, seed=3)
    items = random_items(np.random.default_rng(2), 1100, [(18, 3), (26, 20)])
    outputs = TorchScorer(model, chunk_size=4).score(items, k=8)
    assert outputs[0].topk.logprobs.dtype == np.float32
    # bf16 logits differ by rounding between a chunked and a whole-sequence head matmul: a loose bound
    check_against_reference(model, items, outputs, k=8, atol=3e-2)


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.max_numel = max(self.max_numel, leaf.numel())
        return out


def test_never_materialises_all_positions_logits(tiny_qwen2_factory: Any) -> None:
    vocab, length, chunk = 4096, 300, 32
    model = tiny_qwen2_factory(vocab_size=vocab, hidden_size=32, max_positions=512)
    item = ScoreItem(tuple(int(x) for x in np.random.default_rng(3).integers(0, vocab, length)), 1,
                     np.zeros((length - 1, 4), dtype=np.int64))
    rows = length - 1
    with MaxNumel() as chunked:
        TorchScorer(model, chunk_size=chunk).score([item], k=16)
    with MaxNumel() as unchunked:  # the tracker does see a T×V tensor when one exists
        TorchScorer(model, chunk_size=10_000).score([item], k=16)
    assert unchunked.max_numel >= rows * vocab
    assert chunked.max_numel <= chunk * vocab + 4096, chunked.max_numel
    assert chunked.max_numel < rows * vocab // 4


@pytest.mark.parametrize(
    "item, k, message",
    [
        (ScoreItem((), 1), 4, r"items\[0\]\.token_ids: must not be empty"),
        (ScoreItem((1, 2, 3), 0), 4, r"items\[0\]\.response_start"),
        (ScoreItem((1, 2, 3), 3), 4, r"items\[0\]\.response_start"),
        (ScoreItem((1, 2, 1000), 1), 4, r"items\[0\]\.token_ids: token id 1000 at position 2 is outside"),
        (ScoreItem((1, -2, 3), 1), 4, r"items\[0\]\.token_ids: token id -2"),
        (ScoreItem(tuple(range(1, 600)), 1), 4, r"items\[0\]\.token_ids: 599 tokens exceed"),
        (ScoreItem((1, 2, 3), 1, np.zeros((3, 2), dtype=np.int64)), 4,
         r"items\[0\]\.candidate_ids: shape must be \[2, K'\]"),
        (ScoreItem((1, 2, 3), 1, np.zeros(2, dtype=np.int64)), 4, r"items\[0\]\.candidate_ids: shape"),
        (ScoreItem((1, 2, 3), 1, np.zeros((2, 2), dtype=np.float32)), 4,
         r"items\[0\]\.candidate_ids: must be an integer"),
        (ScoreItem((1, 2, 3), 1, np.array([[1], [1000]])), 4, r"items\[0\]\.candidate_ids: id 1000 at \[1, 0\]"),
        (ScoreItem((1, 2, 3), 1, np.array([[1], [-3]])), 4, r"items\[0\]\.candidate_ids: id -3"),
        (ScoreItem((1, 2, 3), 1), 0, r"k: must be an integer in 1\.\.1000"),
        (ScoreItem((1, 2, 3), 1), 1001, r"k: must be an integer in 1\.\.1000"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(tiny_qwen2: Any, item: ScoreItem, k: int, message: str) -> None:
    scorer = TorchScorer(tiny_qwen2)
    with pytest.raises(ValueError, match=message):
        scorer.score([item], k=k)


def test_a_bad_item_is_found_before_any_compute(tiny_qwen2: Any) -> None:
    good = ScoreItem((1, 2, 3), 1)
    with pytest.raises(ValueError, match=r"items\[2\]\.token_ids"):
        TorchScorer(tiny_qwen2).score([good, good, ScoreItem((), 1)], k=2)
    assert TorchScorer(tiny_qwen2).score([], k=2) == []


def test_from_pretrained_round_trip(tiny_qwen2: Any, tmp_path: Any) -> None:
    tiny_qwen2.save_pretrained(tmp_path)
    loaded = TorchScorer.from_pretrained(tmp_path, device="cpu", dtype="float32", chunk_size=3)
    assert loaded.device.type == "cpu" and loaded.chunk_size == 3 and loaded.max_context == 512
    items = random_items(np.random.default_rng(4), 1000, [(15, 6)])
    a, b = loaded.score(items, k=5)[0], TorchScorer(tiny_qwen2).score(items, k=5)[0]
    np.testing.assert_allclose(a.topk.logprobs, b.topk.logprobs, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="dtype"):
        TorchScorer.from_pretrained(tmp_path, dtype="float8")
