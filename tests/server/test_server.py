"""The teacher server for real: `brts serve` in a subprocess on loopback (hf engine, the fitted toy teacher).

Covers byte-identical cached replies, coalescing + single flight (four clients, one generation), every bad
input with its status code while the server keeps serving, a stock health check, reflection, the Score path,
and a clean SIGTERM stop. Security (TLS, token, non-loopback refusal), kill -9 during prewarm, and Score under
a long generation are in ``test_server_ops.py``.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_proc import ServerProcess  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

from brts.proto import teacher_pb2, teacher_pb2_grpc
from brts.shared.client import Prompt, TeacherClient, TeacherMismatchError, TeacherUnavailableError  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.shared.topk import from_proto, to_proto  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.toy import make_problems, toy_prompt_spec  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

SERVE_ARGS = ["sampling.max_new_tokens=24", "sampling.temperature=1.0", "batch_window_ms=300"]


@pytest.fixture(scope="module")
def server(toy_teacher_dir, tmp_path_factory):
    proc = ServerProcess(toy_teacher_dir, tmp_path_factory.mktemp("serve-cache"), SERVE_ARGS)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def prompts(toy_tokenizer):
    spec = toy_prompt_spec(toy_tokenizer)
    return [Prompt(p.id, tuple(spec.encode(p.problem)), p.answer, n_tier1=3, n_tier2=2)
            for p in make_problems(6, seed=321)]


def _wire(results):
    return sorted((r.prompt_id, [(c.token_ids.tobytes(), c.topk_ids.tobytes(), c.topk_logprobs.tobytes(), c.answer,
                                  c.correct, c.leaked) for c in r.candidates]) for r in results)


def test_cached_replies_are_byte_identical(server, prompts):
    with TeacherClient(server.address) as client:
        first = list(client.get_candidates(prompts, logprob_k=16))
        second = list(client.get_candidates(prompts, logprob_k=16))
    assert {r.prompt_id for r in first} == {p.prompt_id for p in prompts}
    assert all(not r.cache_hit for r in first) and all(r.cache_hit for r in second)
    assert _wire(first) == _wire(second)
    for r in first:
        for c in r.candidates:
            assert c.topk_ids.shape == (c.token_ids.size, 16) and c.topk_logprobs.dtype == np.float16


def test_four_clients_one_generation(server, toy_tokenizer):
    spec = toy_prompt_spec(toy_tokenizer)
    p = make_problems(1, seed=999)[0]
    prompt = Prompt("same", tuple(spec.encode(p.problem)), p.answer, n_tier1=4)
    results, barrier = [], threading.Barrier(4)

    def ask():
        with TeacherClient(server.address) as client:
            barrier.wait()
            results.append(list(client.get_candidates([prompt]))[0])

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len({tuple(_wire([r])[0][1]) for r in results}) == 1
    assert sum(not r.cache_hit for r in results) >= 1
    # the per-process counters are checked at the end (test_stop_reports_counts): 4 entries, not 16


def test_packed_tokens_carry_the_same_tokens_and_plain_clients_still_get_the_repeated_field(server, prompts):
    """`packed_tokens` (what brts.shared.client asks for) is additive: an older client that does not set it gets
    the repeated `token_ids` field as before, with the same tokens."""
    channel, stub = _raw_stub(server)
    with channel:
        def ask(packed):
            req = teacher_pb2.CandidatesRequest(prompts=[teacher_pb2.PromptRequest(
                prompt_id=p.prompt_id, prompt_ids=list(p.prompt_ids), ground_truth=p.ground_truth, n_tier1=p.n_tier1,
                n_tier2=p.n_tier2) for p in prompts], logprob_k=4, packed_tokens=packed)
            return {m.prompt_id: m for m in stub.GetCandidates(req, timeout=600)}

        plain, packed = ask(False), ask(True)
    assert plain.keys() == packed.keys()
    for pid, msg in plain.items():
        assert len(msg.candidates) == len(packed[pid].candidates) > 0
        for a, b in zip(msg.candidates, packed[pid].candidates):
            assert not a.token_ids_packed.dtype and len(a.token_ids) > 0
            assert len(b.token_ids) == 0 and b.token_ids_packed.dtype == "int32"
            assert from_proto(b.token_ids_packed).tolist() == list(a.token_ids)
            assert a.topk_ids == b.topk_ids and a.answer == b.answer


def _raw_stub(server):
    channel = grpc.insecure_channel(server.address)
    return channel, teacher_pb2_grpc.TeacherServiceStub(channel)


def _expect(code, call, match):
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details(), info.value.details()


def test_bad_inputs_get_their_status_and_the_server_keeps_serving(server, prompts):
    channel, stub = _raw_stub(server)
    good = list(prompts[0].prompt_ids)

    def cands(**kw):
        p = dict(prompt_id="x", prompt_ids=good, ground_truth="1", n_tier1=1)
        p.update(kw.pop("prompt", {}))
        req = teacher_pb2.CandidatesRequest(prompts=[teacher_pb2.PromptRequest(**p)], **kw)
        return lambda: list(stub.GetCandidates(req, timeout=300))

    bad = grpc.StatusCode.INVALID_ARGUMENT
    _expect(bad, cands(prompt={"prompt_ids": []}), "prompts[0].prompt_ids: must not be empty")
    _expect(bad, cands(prompt={"prompt_ids": good + [151936]}), "outside 0..151935")
    _expect(bad, cands(prompt={"prompt_ids": [-3]}), "prompts[0].prompt_ids[0]")
    _expect(bad, cands(logprob_k=17), "logprob_k: must be in 1..16")
    _expect(bad, cands(prompt={"n_tier1": -1}), "prompts[0].n_tier1")
    _expect(bad, cands(prompt={"n_tier2": 100000}), "prompts[0].n_tier2")
    _expect(bad, cands(prompt={"pool_offset": -5}), "prompts[0].pool_offset")
    _expect(bad, cands(prompt={"n_tier2": 1, "ground_truth": ""}), "prompts[0].ground_truth: required")
    _expect(bad, cands(prompt={"perturb_position": "system"}), "prompts[0].perturb_position: must be one of user, "
            "after_template")
    _expect(bad, cands(sampling=teacher_pb2.Sampling(temperature=-0.5)), "sampling.temperature")
    _expect(bad, cands(sampling=teacher_pb2.Sampling(top_p=1.5)), "sampling.top_p")
    _expect(bad, cands(sampling=teacher_pb2.Sampling(top_p=0.0)), "sampling.top_p")
    too_long = (good * (8192 // len(good) + 1))[: 8192 - 10]  # + max_new_tokens 24 > the toy's 8,192 positions
    _expect(bad, cands(prompt={"prompt_ids": too_long}), "exceed the teacher's context")
    _expect(grpc.StatusCode.FAILED_PRECONDITION, cands(expected_teacher="teacher-other"), "expected_teacher")
    _expect(bad, lambda: list(stub.GetCandidates(teacher_pb2.CandidatesRequest(), timeout=300)), "prompts: must hold")

    seq = good + [16, 17, 18]

    def score(**kw):
        item = dict(token_ids=seq, response_start=len(good))
        item.update(kw)
        return lambda: stub.Score(
            teacher_pb2.ScoreRequest(items=[teacher_pb2.ScoreItem(**item)], logprob_k=4), timeout=300
        )

    _expect(bad, score(response_start=0), "items[0].response_start")
    _expect(bad, score(response_start=len(seq)), "items[0].response_start")
    _expect(bad, score(token_ids=(seq * (8192 // len(seq) + 2))[:8200]), "exceed the teacher's context")
    wrong_dtype = teacher_pb2.Array(dtype="float32", shape=[3, 2], data=np.zeros((3, 2), np.float32).tobytes())
    _expect(bad, score(candidate_ids=wrong_dtype), "items[0].candidate_ids: must be int32")
    wrong_bytes = teacher_pb2.Array(dtype="int32", shape=[3, 2], data=b"\x00" * 7)
    _expect(bad, score(candidate_ids=wrong_bytes), "items[0].candidate_ids.data")
    wrong_shape = to_proto(np.zeros((2, 2), np.int32))
    _expect(bad, score(candidate_ids=wrong_shape), "one row per response position")
    _expect(bad, score(candidate_ids=to_proto(np.full((3, 2), 200000, np.int32))), "candidate_ids: ids must be in")
    # ...and the next good calls are answered
    assert len(list(cands()())) == 1
    reply = score(candidate_ids=to_proto(np.array([[16, 17], [17, -1], [18, 0]], np.int32)))()
    assert len(reply.results) == 1
    channel.close()


def test_score_matches_the_candidates_topk(server, prompts):
    with TeacherClient(server.address) as client:
        (r,) = list(client.get_candidates(prompts[:1], logprob_k=16))
        cand = r.candidates[0]
        seq = list(prompts[0].prompt_ids) + cand.token_ids.tolist()
        (s,) = client.score([seq], [len(prompts[0].prompt_ids)], [cand.topk_ids[:, :5]], logprob_k=8)
    assert s.topk_ids.shape == (cand.token_ids.size, 8) and s.topk_logprobs.dtype == np.float32
    np.testing.assert_allclose(s.candidate_logprobs, cand.topk_logprobs[:, :5].astype(np.float32), rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(s.topk_logprobs[:, :5], s.candidate_logprobs, atol=1e-5)


def test_health_reflection_and_info(server, toy_teacher_dir):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "brts.v1.TeacherService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=120).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=120)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"brts.v1.TeacherService", "grpc.health.v1.Health"} <= names
    channel.close()
    with TeacherClient(server.address) as client:
        info = client.info
        assert info.vocab_size == 151936 and info.max_logprob_k == 16 and info.engine == "hf"
        assert info.teacher_fingerprint.startswith("teacher-")
    with pytest.raises(TeacherMismatchError, match="expected teacher-nope"):
        TeacherClient(server.address, expected_teacher="teacher-nope")


def test_a_server_that_is_down_is_named(server):
    with pytest.raises(TeacherUnavailableError, match="teacher server 127.0.0.1:1: not reachable"):
        TeacherClient("127.0.0.1:1", connect_timeout_s=1)


def test_stop_reports_counts(server):
    """Runs last in this module: SIGTERM drains and closes; the counters show what was generated, and how."""
    counts = ServerProcess.counts(server.stop())
    # entries: 6 prompts x 3 Tier-1 (+ Tier-2 attempts where all 3 were wrong) and 4 for the shared prompt; the
    # good call after the bad inputs asked for an entry that was already cached
    assert 6 * 3 + 4 <= counts["generated"] <= 6 * 3 + 6 * 2 + 4
    # four clients at once: one engine call for the shared prompt (no Tier 2 asked), so calls stay few
    assert counts["engine_calls"] <= 2 + 1 + 1
