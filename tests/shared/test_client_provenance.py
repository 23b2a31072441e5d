"""What the client reads of the log-prob contract (shared/client.py): each candidate's ``logprob_source``, from a
protobuf-built message and from the server's hand-spliced fast path (server/wire.py), "" from an older server;
and the ``InfoReply`` fields 8-12 in ``ServerInfo``, with their defaults from an older server."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from brts.proto import teacher_pb2
from brts.server.wire import encode_prompt
from brts.shared.client import ServerInfo, _candidates, _server_info
from brts.shared.topk import TopK, to_proto

IDS = np.array([[4, 2], [9, -1]], dtype=np.int32)
LOGPROBS = np.array([[-0.5, -1.5], [-0.25, -np.inf]], dtype=np.float16)


def _message(sources: list[str]) -> bytes:
    msg = teacher_pb2.PromptCandidates(prompt_id="p0", cache_hit=True)
    for n, source in enumerate(sources):
        c = msg.candidates.add(tier=1, index=n, answer="7", finish_reason="stop", cached=True, logprob_source=source)
        to_proto(np.array([5, 6], dtype=np.int32), "int32", c.token_ids_packed)
        to_proto(IDS, "int32", c.topk_ids)
        to_proto(LOGPROBS, "float16", c.topk_logprobs)
    return msg.SerializeToString()


def test_each_candidate_keeps_its_source_and_an_older_server_sends_none() -> None:
    sources = ["scorer", "engine-decode", "engine-prefill", ""]
    got = _candidates(teacher_pb2.PromptCandidates.FromString(_message(sources)))
    assert [c.logprob_source for c in got.candidates] == sources
    assert np.array_equal(got.candidates[1].topk_ids, IDS) and got.candidates[1].topk_logprobs.dtype == np.float16


def test_the_spliced_fast_path_carries_the_source_too() -> None:
    def served(source: str, topk: bool) -> SimpleNamespace:
        return SimpleNamespace(tier=1, index=0, answer="7", correct=True, leaked=False, finish_reason="stop",
                               cached=True, token_ids=np.array([5, 6], dtype=np.int32),
                               topk=TopK(IDS, LOGPROBS) if topk else None, source=source)

    prompt = SimpleNamespace(prompt_id="p0", tier2_drawn=0, tier2_leaked=0, cache_hit=True, seconds=0.0, missing=0,
                             candidates=[served("engine-decode", True), served("engine-prefill", False)])
    got = _candidates(teacher_pb2.PromptCandidates.FromString(encode_prompt(prompt)))
    assert [c.logprob_source for c in got.candidates] == ["engine-decode", ""]  # no top-K: no source
    assert got.candidates[1].topk_ids is None


def test_server_info_reads_the_log_prob_contract_and_defaults_for_older_servers() -> None:
    reply = teacher_pb2.InfoReply(teacher_fingerprint="t", tokenizer_fingerprint="k", vocab_size=10,
                                  max_logprob_k=16, engine="vllm", model="m", dtype="bfloat16",
                                  logprob_source="engine", logprob_temperature=1.0,
                                  logprob_normalisation="full-logits", logprob_k_served=16, engine_deterministic=True)
    info = _server_info(reply)
    assert (info.logprob_source, info.logprob_temperature, info.logprob_normalisation, info.logprob_k_served,
            info.engine_deterministic) == ("engine", pytest.approx(1.0), "full-logits", 16, True)
    older = _server_info(teacher_pb2.InfoReply(teacher_fingerprint="t", dtype="float32"))
    assert older == ServerInfo("t", "", 0, 0, "", "", "float32")
