"""The sglang adapter against a test double of SGLang's native ``/generate`` at the engine boundary.

SGLang cannot run here (platform-notes §4), so a stdlib HTTP server on 127.0.0.1 answers ``/generate`` with
replies in SGLang's documented ``meta_info`` format (engine-apis.md §1): ``finish_reason`` dicts, ``[logprob,
token_id, text]`` triples, a null entry at ``logprob_start_len``, top-k rows with fewer than K entries. The tests
check the request the adapter sends (every field and value) and that replies round-trip into the proto's
conventions. The engine-mode path of issue #21 (decode-time top-K, prefill top-K without candidate ids) runs
against a double that computes its replies with a real tiny model, so its numbers are checked against the exact
scorer. The real engine runs through the shared contract tests wherever sglang imports.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np
import pytest

from brts.shared.engines.base import GenerationEngine, GenerationRequest, SamplingParams, ScoreItem
from brts.shared.engines.sglang_engine import SGLANG_MISSING, SGLangEngine

EOS, EOS2 = 151645, 151643
VOCAB, CTX = 151936, 64


class Double:
    """What the fake server saw, and how it answers (``respond(path, body) -> (status, json)``)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.respond: Callable[[str, dict[str, Any]], tuple[int, Any]] = lambda path, body: (500, {"error": "unset"})


@pytest.fixture(scope="module")
def _server():
    double = Double()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            double.seen.append((self.path, body))
            status, obj = double.respond(self.path, body)
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield double, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(_server):
    double, url = _server
    double.seen.clear()
    double.respond = lambda path, body: (500, {"error": "no reply scripted"})
    return double, url


@pytest.fixture
def engine(server):
    return SGLangEngine(transport="http", base_url=server[1] + "/", vocab_size=VOCAB, max_context=CTX,
                        eos_token_ids=(EOS, EOS2), timeout_s=10)


def triple(lp: float | None, tid: int) -> list[Any]:
    return [lp, tid, None]


def gen_reply(tokens: list[int], finish: dict[str, Any], top: list[list[list[Any]]] | None = None,
              lps: list[float] | None = None) -> dict[str, Any]:
    """A reply item as SGLang writes it (``return_text_in_logprobs=False`` → text null in the triples)."""
    meta: dict[str, Any] = {"id": "x", "finish_reason": finish, "prompt_tokens": 3,
                            "completion_tokens": len(tokens), "cached_tokens": 0}
    if lps is not None:
        meta["output_token_logprobs"] = [triple(lp, t) for lp, t in zip(lps, tokens)]
        meta["output_top_logprobs"] = top
    return {"text": "", "output_ids": tokens, "meta_info": meta}


def test_generate_request_is_built_as_documented(engine, server):
    double, _ = server
    double.respond = lambda path, body: (200, [gen_reply([7], {"type": "length", "length": 1})] * 4)
    reqs = [GenerationRequest((1, 2, 3), (10, 11, 12)), GenerationRequest((4, 5), (99,))]
    out = engine.generate(reqs, SamplingParams(temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=1))
    assert [len(per) for per in out] == [3, 1]
    assert len(double.seen) == 1  # all requests × seeds in one batched call
    path, body = double.seen[0]
    assert path == "/generate"
    assert body["input_ids"] == [[1, 2, 3]] * 3 + [[4, 5]]  # n-free repetition: one entry per sample
    assert body["return_logprob"] is False and body["logprob_start_len"] == -1 and body["stream"] is False
    expected = {
        "max_new_tokens": 1, "min_new_tokens": 0, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.0,
        "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "n": 1,
        "stop_token_ids": [EOS, EOS2], "ignore_eos": False, "skip_special_tokens": False, "no_stop_trim": True,
    }
    assert body["sampling_params"] == [{**expected, "sampling_seed": s} for s in (10, 11, 12, 99)]


def test_generate_replies_round_trip_with_the_eos_convention(engine, server):
    double, _ = server
    double.respond = lambda path, body: (200, [
        gen_reply([5, 6, EOS], {"type": "stop", "matched": EOS}),  # no_stop_trim honoured: EOS kept
        gen_reply([8], {"type": "stop", "matched": EOS2}),  # EOS trimmed by the server: put back once
        gen_reply([1, 2, 3], {"type": "length", "length": 3}),
        gen_reply([], {"type": "stop", "matched": EOS}),  # EOS as the very first token, trimmed
    ])
    out = engine.generate([GenerationRequest((1,), (0, 1)), GenerationRequest((2,), (2, 3))],
                          SamplingParams(max_new_tokens=3))
    assert [[(g.token_ids, g.finish_reason) for g in per] for per in out] == [
        [((5, 6, EOS), "stop"), ((8, EOS2), "stop")],
        [((1, 2, 3), "length"), ((EOS,), "stop")],
    ]


def test_generate_with_logprobs_pads_and_sorts_topk(engine, server):
    double, _ = server
    top = [
        [triple(-2.0, 9), triple(-0.5, 5), triple(-1.0, 4)],  # unsorted, 3 < K entries
        [triple(-0.1, 6)],  # one entry
        [triple(None, 3), triple(-0.3, EOS)],  # a null log-prob is not an entry
    ]
    double.respond = lambda path, body: (200, [
        gen_reply([5, 6, EOS], {"type": "stop", "matched": EOS}, top=top, lps=[-0.5, -0.1, -0.3])])
    s = engine.generate_with_logprobs([GenerationRequest((1, 2), (3,))], SamplingParams(max_new_tokens=3), 4)[0][0]
    body = double.seen[0][1]
    assert body["return_logprob"] is True and body["top_logprobs_num"] == 4 and body["logprob_start_len"] == -1
    assert s.generation.token_ids == (5, 6, EOS) and s.generation.finish_reason == "stop"
    np.testing.assert_array_equal(s.token_logprobs, np.float32([-0.5, -0.1, -0.3]))
    np.testing.assert_array_equal(s.topk.ids, [[5, 4, 9, -1], [6, -1, -1, -1], [EOS, -1, -1, -1]])
    np.testing.assert_array_equal(s.topk.logprobs[:, 0], np.float32([-0.5, -0.1, -0.3]))
    assert np.isneginf(s.topk.logprobs[0, 3]) and np.isneginf(s.topk.logprobs[1, 1:]).all()


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        ([gen_reply([5], {"type": "abort", "message": "oom"})], r"requests\[0\]\.seeds\[0\]: sglang finished with"),
        ([gen_reply([5, 77], {"type": "stop", "matched": 77})], r"stopped on token 77, which is not one of eos"),
        ([gen_reply([5], {"type": "stop", "matched": "###"})], r"stopped on '###', not on an EOS token"),
        ([gen_reply([5, EOS, 6], {"type": "length", "length": 3})], r"an EOS token appears before the end"),
        ([], r"sglang returned 0 replies for 1 batch entries"),
    ],
    ids=["abort", "non-eos-stop", "stop-string", "stray-eos", "reply-count"],
)
def test_malformed_replies_raise(engine, server, reply, match):
    server[0].respond = lambda path, body: (200, reply)
    with pytest.raises(RuntimeError, match=match):
        engine.generate([GenerationRequest((1,), (0,))], SamplingParams(max_new_tokens=3))


def test_logprob_rows_must_align_with_tokens(engine, server):
    server[0].respond = lambda path, body: (200, [
        gen_reply([5, 6], {"type": "length", "length": 2}, top=[[triple(-1.0, 5)]], lps=[-1.0])])
    with pytest.raises(RuntimeError, match=r"1 output_token_logprobs for 2 tokens"):
        engine.generate_with_logprobs([GenerationRequest((1,), (0,))], SamplingParams(max_new_tokens=2), 2)


def test_http_errors_surface(engine, server):
    server[0].respond = lambda path, body: (400, {"error": {"message": "bad sampling_seed"}})
    with pytest.raises(RuntimeError, match=r"HTTP 400: .*bad sampling_seed"):
        engine.generate([GenerationRequest((1,), (0,))], SamplingParams(max_new_tokens=1))


@pytest.mark.parametrize(
    ("prompt", "seed", "match"),
    [
        ((), 0, r"requests\[1\]\.prompt_ids: must not be empty"),
        ((1, VOCAB), 0, r"requests\[1\]\.prompt_ids: token id 151936 at position 1 is outside"),
        (tuple(range(1, CTX + 2)), 0, r"requests\[1\]\.prompt_ids: 65 tokens exceed the engine's context of 64"),
        ((1, 2), -1, r"requests\[1\]\.seeds\[0\]: must be an integer in 0\.\.2\*\*63-1"),
    ],
    ids=["empty", "out-of-vocab", "over-long", "negative-seed"],
)
def test_invalid_inputs_never_reach_the_server(engine, server, prompt, seed, match):
    with pytest.raises(ValueError, match=match):
        engine.generate([GenerationRequest((1, 2), (0,)), GenerationRequest(prompt, (seed,))],
                        SamplingParams(max_new_tokens=2))
    assert server[0].seen == []


def test_score_via_prefill_request_and_reply(engine, server):
    double, _ = server
    seq = (11, 12, 13, 14, 15, 16)  # prompt 11 12 13 | response 14 15 16
    cand = np.array([[20, -1], [14, 21], [16, 20]], dtype=np.int64)
    union = [14, 16, 20, 21]

    def respond(path, body):
        tok = [triple(None, 13), triple(-1.5, 14), triple(-0.7, 15), triple(-2.5, 16)]  # null at the start position
        top = [None, [triple(-1.5, 14), triple(-0.2, 30)], [triple(-0.7, 15)], [triple(-0.9, 31), triple(-2.5, 16)]]
        by_id = [None] + [[triple(-3.0 - t - i / 10, u) for i, u in enumerate(union)] for t in range(3)]
        return 200, [{"text": "", "output_ids": [], "meta_info": {
            "finish_reason": {"type": "length", "length": 0}, "input_token_logprobs": tok,
            "input_top_logprobs": top, "input_token_ids_logprobs": by_id}}]

    double.respond = respond
    [res] = engine.score_via_prefill([ScoreItem(seq, 3, candidate_ids=cand)], k=3)
    body = double.seen[0][1]
    assert body["input_ids"] == [list(seq)]
    assert body["sampling_params"] == [{"max_new_tokens": 0, "temperature": 1.0, "skip_special_tokens": False}]
    assert body["return_logprob"] is True and body["top_logprobs_num"] == 3
    assert body["logprob_start_len"] == [2]  # prompt_len - 1, not 0 (which defeats the radix cache)
    assert body["token_ids_logprob"] == [union]
    np.testing.assert_array_equal(res.topk.ids, [[30, 14, -1], [15, -1, -1], [31, 16, -1]])
    np.testing.assert_allclose(res.topk.logprobs[:, 0], [-0.2, -0.7, -0.9])
    expected = np.float32([[-3.2, -np.inf], [-3.0 - 1 - 0.0, -4.3], [-5.1, -5.2]])
    np.testing.assert_allclose(res.candidate_logprobs, expected, rtol=0, atol=1e-6)


def test_score_via_prefill_rejects_misaligned_replies_and_bad_items(engine, server):
    server[0].respond = lambda path, body: (200, [{"meta_info": {
        "input_token_logprobs": [triple(-1.0, 14)], "input_top_logprobs": [[triple(-1.0, 14)]]}}])
    with pytest.raises(RuntimeError, match=r"expected 2 input log-prob entries \(the first null\)"):
        engine.score_via_prefill([ScoreItem((11, 12, 14), 2)], k=2)
    with pytest.raises(ValueError, match=r"items\[0\]\.response_start: must be in 1\.\.2, got 0"):
        engine.score_via_prefill([ScoreItem((11, 12, 14), 0)], k=2)
    with pytest.raises(ValueError, match=r"items\[0\]\.candidate_ids: must be an integer array \[1, K'\]"):
        engine.score_via_prefill([ScoreItem((11, 12, 14), 2, candidate_ids=np.zeros((2, 2), np.int64))], k=2)


def test_engine_facts_from_a_local_model_folder(server, tmp_path):
    from transformers import GenerationConfig, Qwen2Config

    Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=512, eos_token_id=EOS2).save_pretrained(tmp_path)
    GenerationConfig(eos_token_id=[EOS, EOS2]).save_pretrained(tmp_path)
    eng = SGLangEngine(tmp_path, transport="http", base_url=server[1])
    assert isinstance(eng, GenerationEngine) and eng.name == "sglang"
    assert (eng.vocab_size, eng.max_context, eng.eos_token_ids) == (VOCAB, 512, (EOS, EOS2))


def test_constructor_and_transport_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^transport: must be 'offline' or 'http'"):
        SGLangEngine(transport="grpc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^base_url: required with transport='http'"):
        SGLangEngine(transport="http", vocab_size=VOCAB, max_context=CTX, eos_token_ids=(EOS,))
    with pytest.raises(ValueError, match=r"^model_path: required unless vocab_size, max_context and eos_token_ids"):
        SGLangEngine(transport="http", base_url="http://127.0.0.1:1", vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"^eos_token_ids: id 151936 is outside"):
        SGLangEngine(transport="http", base_url="http://127.0.0.1:1", vocab_size=VOCAB, max_context=CTX,
                     eos_token_ids=(VOCAB,))
    closed = SGLangEngine(transport="http", base_url="http://127.0.0.1:9", vocab_size=VOCAB, max_context=CTX,
                          eos_token_ids=(EOS,), timeout_s=5)
    with pytest.raises(ConnectionError, match=r"not reachable"):
        closed.generate([GenerationRequest((1,), (0,))], SamplingParams(max_new_tokens=1))


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang is installed here")
def test_offline_transport_without_sglang_says_how_to_install(monkeypatch):
    from brts.shared.engines.sglang_engine import ORIGINAL_LOGPROB_ENV

    for name in ORIGINAL_LOGPROB_ENV:
        monkeypatch.delenv(name, raising=False)  # the adapter sets them before importing sglang: restore after
    with pytest.raises(ImportError) as err:
        SGLangEngine("/nonexistent", transport="offline", vocab_size=VOCAB, max_context=CTX, eos_token_ids=(EOS,))
    assert str(err.value) == SGLANG_MISSING and "\n" not in SGLANG_MISSING
    assert SGLANG_MISSING.startswith("sglang is not installed (it needs CUDA; see platform-notes §4)")


# ---------------------------------------------------------------------- engine mode (issue #21)

def _model_backed(model: Any) -> Callable[[str, dict[str, Any]], tuple[int, Any]]:
    """A ``/generate`` that answers as an SGLang server with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` documents:
    log-probs are the model's T=1 ``log_softmax`` (here an fp32 transformers forward of ``model``) whatever the
    temperature. Generation draws at T=1 from a generator seeded with ``sampling_seed`` (the double's choice; the
    numbers are what is checked) and stops on ``stop_token_ids`` keeping the EOS (``no_stop_trim``); a
    ``max_new_tokens: 0`` entry is a prefill, whose ``input_*`` lists start with a null entry at
    ``logprob_start_len``."""
    import torch

    def logp(seq: list[int]) -> Any:
        with torch.no_grad():
            return model(torch.tensor([seq])).logits[0].float().log_softmax(-1)

    def top(row: Any, k: int) -> list[list[Any]]:
        vals, ids = row.topk(k)
        return [triple(float(v), int(i)) for v, i in zip(vals, ids)]

    def generation(ids: list[int], sp: dict[str, Any], k: int) -> dict[str, Any]:
        seq, tok_lps, tops, finish = list(ids), [], [], {"type": "length", "length": sp["max_new_tokens"]}
        gen = torch.Generator().manual_seed(sp["sampling_seed"])
        for _ in range(sp["max_new_tokens"]):
            row = logp(seq)[-1]
            tok = int(torch.multinomial(row.exp(), 1, generator=gen))
            seq.append(tok)
            tok_lps.append(float(row[tok]))
            tops.append(top(row, k))
            if tok in sp["stop_token_ids"]:
                finish = {"type": "stop", "matched": tok}
                break
        return gen_reply(seq[len(ids):], finish, top=tops, lps=tok_lps)

    def prefill(ids: list[int], start: int, k: int) -> dict[str, Any]:
        lp = logp(ids)
        rest = range(start + 1, len(ids))
        tok = [triple(None, ids[start])] + [triple(float(lp[p - 1, ids[p]]), ids[p]) for p in rest]
        tops = [None] + [top(lp[p - 1], k) for p in rest]
        return {"text": "", "output_ids": [], "meta_info": {"finish_reason": {"type": "length", "length": 0},
                                                            "input_token_logprobs": tok, "input_top_logprobs": tops}}

    def respond(path: str, body: dict[str, Any]) -> tuple[int, Any]:
        k, out = body["top_logprobs_num"], []
        for i, (ids, sp) in enumerate(zip(body["input_ids"], body["sampling_params"])):
            if sp["max_new_tokens"] == 0:
                out.append(prefill(ids, body["logprob_start_len"][i], k))
            else:
                out.append(generation(ids, sp, k))
        return 200, out

    return respond


def test_engine_mode_decode_and_prefill_match_the_exact_scorer(server, tiny_qwen2):
    """The engine-mode path end to end over the documented reply format, with the numbers of a real model: Tier-1
    decode-time top-K and the prefill top-K of (prompt + response) both equal the exact scorer within 1e-4 (fp32),
    rows finishing early included; the prefill sends no candidate ids and returns ``candidate_logprobs`` None."""
    from brts.shared.engines.base import ENGINE_TOLERANCE, DecodeLogprobs, PrefillTopK
    from brts.shared.engines.scorer import TorchScorer

    double, url = server
    double.respond = _model_backed(tiny_qwen2)
    prompts = [(11, 12, 13), tuple(range(40, 61)), (7,)]
    reqs = [GenerationRequest(p, (i,)) for i, p in enumerate(prompts)]
    k, sampling = 6, SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=8)

    def make(eos: int) -> SGLangEngine:
        return SGLangEngine(transport="http", base_url=url, vocab_size=1000, max_context=512, eos_token_ids=(eos,),
                            timeout_s=30)

    free = [per[0].token_ids for per in make(999).generate(reqs, sampling)]
    assert all(len(t) == 8 for t in free)
    # an EOS that ends the first prompt's sample after a few tokens and no other sample (seeded: as drawn above)
    cut = next(t for t in range(2, 8) if free[0][t] not in free[0][:t] + free[1] + free[2])
    engine = make(free[0][cut])
    assert isinstance(engine, DecodeLogprobs) and isinstance(engine, PrefillTopK) and engine.deterministic is False
    double.seen.clear()
    out = engine.generate_with_logprobs(reqs, sampling, k)
    body = double.seen[0][1]
    assert body["return_logprob"] is True and body["top_logprobs_num"] == k and body["logprob_start_len"] == -1
    samples = [per[0] for per in out]
    assert [s.generation.finish_reason for s in samples] == ["stop"] + ["length"] * (len(prompts) - 1)
    assert samples[0].generation.token_ids == free[0][: cut + 1]
    items = [ScoreItem(p + s.generation.token_ids, len(p)) for p, s in zip(prompts, samples)]
    prefilled = engine.score_via_prefill(items, k)
    body = double.seen[1][1]
    assert "token_ids_logprob" not in body and body["logprob_start_len"] == [len(p) - 1 for p in prompts]
    scorer, worst = TorchScorer(tiny_qwen2), 0.0
    for s, pre, item in zip(samples, prefilled, items):
        assert pre.candidate_logprobs is None and pre.topk.ids.shape == s.topk.ids.shape == (s.topk.length, k)
        np.testing.assert_array_equal(pre.topk.ids, s.topk.ids)
        cand = np.asarray(s.generation.token_ids, np.int64)[:, None]
        (ref,) = scorer.score([ScoreItem(item.token_ids, item.response_start, cand)], k)
        worst = max(worst, float(np.abs(ref.topk.logprobs - s.topk.logprobs).max()),
                    float(np.abs(ref.topk.logprobs - pre.topk.logprobs).max()),
                    float(np.abs(ref.candidate_logprobs[:, 0] - s.token_logprobs).max()))
    assert worst <= ENGINE_TOLERANCE["float32"], worst


def test_offline_transport_starts_sglang_with_original_logprobs_and_deterministic_inference(monkeypatch, tmp_path):
    """What the adapter hands the SGLang it starts (a stand-in ``sglang`` module records it): the raw-log-prob
    environment set before SGLang is imported, deterministic inference on, and ``deterministic`` saying so."""
    import os
    import sys
    import types

    from brts.shared.engines.sglang_engine import ORIGINAL_LOGPROB_ENV

    for name in ORIGINAL_LOGPROB_ENV:
        monkeypatch.delenv(name, raising=False)  # restored after the test: the adapter sets it process-wide
    started: list[tuple[dict[str, Any], dict[str, str | None]]] = []

    class Engine:
        def __init__(self, **kwargs: Any) -> None:
            started.append((kwargs, {name: os.environ.get(name) for name in ORIGINAL_LOGPROB_ENV}))

        def shutdown(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(Engine=Engine))
    eng = SGLangEngine(tmp_path, transport="offline", vocab_size=VOCAB, max_context=CTX, eos_token_ids=(EOS,))
    kwargs, env = started[-1]
    assert env == {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1", "RETURN_ORIGINAL_LOGPROB": "1"}
    assert kwargs["enable_deterministic_inference"] is True and eng.deterministic is True
    eng.close()
    off = SGLangEngine(tmp_path, transport="offline", vocab_size=VOCAB, max_context=CTX, eos_token_ids=(EOS,),
                       engine_kwargs={"enable_deterministic_inference": False})
    assert started[-1][0]["enable_deterministic_inference"] is False and off.deterministic is False
    told = SGLangEngine(transport="http", base_url="http://127.0.0.1:9", vocab_size=VOCAB, max_context=CTX,
                        eos_token_ids=(EOS,), deterministic=True)
    assert told.deterministic is True
