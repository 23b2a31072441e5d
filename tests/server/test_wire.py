"""The spliced GetCandidates encoding (server/wire.py) parses to exactly the message protobuf builds."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from brts.proto import teacher_pb2
from brts.server.service import prompt_message
from brts.server.wire import _varint, encode_prompt, serialize_reply
from brts.shared.topk import TopK


def _served(n_candidates: int, length: int, k: int, dtype: str, with_topk: bool = True) -> SimpleNamespace:
    rng = np.random.default_rng(length)
    cands = []
    for i in range(n_candidates):
        n = length + 37 * i  # lengths across the 1- and 2-byte varint boundary of the sizes
        lps = -np.sort(rng.random((n, k)), axis=1).astype(dtype)
        topk = TopK(rng.integers(0, 151936, (n, k)).astype(np.int32), lps) if with_topk else None
        cands.append(SimpleNamespace(tier=1 + i % 2, index=i, answer=None if i == 0 else f"{i}/7", correct=i % 2 == 1,
                                     leaked=i == 2, finish_reason="stop" if i % 2 else "length", cached=i > 0,
                                     token_ids=rng.integers(0, 151936, n).astype(np.int32), topk=topk,
                                     source=("scorer", "engine-decode", "engine-prefill")[i % 3]))
    return SimpleNamespace(prompt_id="dapo-17@3", tier2_drawn=2, tier2_leaked=1, cache_hit=False, seconds=1.5,
                           missing=0, candidates=cands)


@pytest.mark.parametrize("n, length, k, dtype, with_topk", [
    (0, 1, 4, "float16", True), (1, 1, 1, "float32", True), (3, 100, 16, "float16", True),
    (4, 4096, 16, "float16", True), (2, 20, 4, "float32", False),
])
def test_spliced_reply_equals_the_protobuf_message(n, length, k, dtype, with_topk):
    served = _served(n, length, k, dtype, with_topk)
    want = prompt_message(served, packed_tokens=True)
    got = teacher_pb2.PromptCandidates.FromString(encode_prompt(served))
    assert got == want
    assert len(encode_prompt(served)) == len(want.SerializeToString())
    sources = [c.logprob_source for c in got.candidates]
    assert sources == [c.source if with_topk else "" for c in served.candidates]  # "" when there is no top-K


def test_varint_and_serializer_pass_through():
    assert [_varint(v) for v in (0, 1, 127, 128, 300, 2**35)] == [
        b"\x00", b"\x01", b"\x7f", b"\x80\x01", b"\xac\x02", b"\x80\x80\x80\x80\x80\x01"]
    msg = teacher_pb2.PromptCandidates(prompt_id="x")
    assert serialize_reply(msg) == msg.SerializeToString() and serialize_reply(b"abc") == b"abc"
