"""The wire contract: generated modules are importable, current, and carry the agreed field numbers."""

from pathlib import Path

from brts.proto import teacher_pb2, teacher_pb2_grpc
from brts.proto.generate import GENERATED, PROTO_DIR, generate


def test_generated_modules_are_not_stale(tmp_path):
    generate(tmp_path)
    for name in GENERATED:
        assert (tmp_path / name).read_bytes() == (PROTO_DIR / name).read_bytes(), f"{name} is stale: run `make proto`"


def test_grpc_module_imports_through_the_package():
    text = (Path(teacher_pb2_grpc.__file__)).read_text()
    assert "from brts.proto import teacher_pb2" in text
    assert (
        hasattr(teacher_pb2_grpc, "TeacherServiceStub")
        and hasattr(teacher_pb2_grpc, "add_TeacherServiceServicer_to_server")
    )


def _numbers(message):
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_field_numbers_match_the_contract():
    assert teacher_pb2.DESCRIPTOR.package == "brts.v1"
    assert _numbers(teacher_pb2.Array) == {"dtype": 1, "shape": 2, "data": 3}
    assert _numbers(teacher_pb2.Sampling) == {"temperature": 1, "top_p": 2, "top_k": 3, "max_new_tokens": 4, "seed": 5}
    assert _numbers(teacher_pb2.PromptRequest) == {
        "prompt_id": 1, "prompt_ids": 2, "ground_truth": 3, "n_tier1": 4, "n_tier2": 5, "pool_offset": 6,
        "perturbation": 7, "perturb_slot": 8, "tier2_keep_leaked": 9, "perturb_position": 10,  # 9, 10: issue #23
    }
    # fields are only ever added: cache_only (5) and PromptCandidates.missing (7) came with the server (issue #5)
    assert _numbers(teacher_pb2.CandidatesRequest) == {
        "prompts": 1, "sampling": 2, "logprob_k": 3, "expected_teacher": 4, "cache_only": 5, "packed_tokens": 6,
    }
    assert _numbers(teacher_pb2.Candidate) == {
        "tier": 1, "index": 2, "token_ids": 3, "answer": 4, "correct": 5, "leaked": 6, "finish_reason": 7,
        "topk_ids": 8, "topk_logprobs": 9, "cached": 10, "token_ids_packed": 11, "logprob_source": 12,
    }
    assert _numbers(teacher_pb2.PromptCandidates) == {
        "prompt_id": 1, "candidates": 2, "tier2_drawn": 3, "tier2_leaked": 4, "cache_hit": 5, "seconds": 6,
        "missing": 7,
    }
    assert _numbers(teacher_pb2.ScoreItem) == {"token_ids": 1, "response_start": 2, "candidate_ids": 3}
    assert _numbers(teacher_pb2.ScoreRequest) == {"items": 1, "logprob_k": 2}
    assert _numbers(teacher_pb2.ScoreResult) == {"candidate_logprobs": 1, "topk_ids": 2, "topk_logprobs": 3}
    # dtype (7) came with the start-up probe (issue #17), the log-prob contract (8-12) and Candidate.logprob_source
    # (12) with the engines' own log-probs (issue #21)
    assert _numbers(teacher_pb2.InfoReply) == {
        "teacher_fingerprint": 1, "tokenizer_fingerprint": 2, "vocab_size": 3, "max_logprob_k": 4, "engine": 5,
        "model": 6, "dtype": 7, "logprob_source": 8, "logprob_temperature": 9, "logprob_normalisation": 10,
        "logprob_k_served": 11, "engine_deterministic": 12,
    }
    methods = {
        m.name: (m.input_type.name, m.output_type.name, m.server_streaming)
        for m in teacher_pb2.DESCRIPTOR.services_by_name["TeacherService"].methods
    }
    assert methods == {
        "GetCandidates": ("CandidatesRequest", "PromptCandidates", True),
        "Score": ("ScoreRequest", "ScoreReply", False),
        "Info": ("InfoRequest", "InfoReply", False),
    }


def test_optional_sampling_fields_report_presence():
    s = teacher_pb2.Sampling()
    assert not s.HasField("temperature")
    s.temperature = 0.0
    assert s.HasField("temperature")  # an explicit 0 (greedy) is distinguishable from "server default"
