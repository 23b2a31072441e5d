"""`brts serve --engine vllm --vllm-url URL` for real: the teacher built exactly as the server builds it
(``build_runtime``) over the session's `vllm serve` (the ``vllm_server`` fixture, tests/conftest.py), its start-up
probe, the log-prob contract in engine mode (``logprob_contract.py``, as test_engine_logprobs_real.py runs it for
the hf engine), and what a client sees over gRPC when the vLLM server goes away.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from logprob_contract import (  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
    ATOL,
    K_NARROW,
    contract_jobs,
    run_contract,
    worst_gap,
)

from brts.shared.engines.base import SOURCE_DECODE, SOURCE_PREFILL, engine_tolerance  # noqa: E402 - after sys.path

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def probed(vllm_server, tmp_path_factory) -> Any:
    """(runtime, probe report): the teacher as `brts serve` builds it, probed, the probe's verdict applied."""
    from brts.server.probe import probe_teacher
    from brts.server.runtime import build_runtime
    from brts.shared.config import SamplingConfig, ServerConfig

    config = ServerConfig(model=str(vllm_server.model), engine="vllm", vllm_url=vllm_server.url, device="cpu",
                          dtype="float32", cache_dir=str(tmp_path_factory.mktemp("vllm-url-cache")), port=0,
                          teacher_logprobs="engine", max_logprob_k=16,
                          sampling=SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=20))
    rt = build_runtime(config)
    try:
        report = probe_teacher(rt, timeout_s=600)
        rt.apply_probe(report)
    except BaseException:
        rt.close()
        raise
    yield rt, report
    rt.close()


def test_probe_passes_and_engine_mode_keeps_the_log_prob_contract(probed, tmp_path):
    from brts.shared.engines.vllm_http import VLLMHttpEngine
    from brts.shared.tokenizer import load_tokenizer

    runtime, report = probed
    print(report.line(), "|", report.mode_line())  # shown with -s
    assert isinstance(runtime.engine, VLLMHttpEngine) and runtime.engine.name == "vllm"
    assert report.decode_gap is not None and report.prefill_gap is not None
    assert report.engine_gap <= engine_tolerance("float32") and report.logprob_mode == "engine"
    assert runtime.pipeline.logprob_mode == "engine" and runtime.max_context == 512

    tokenizer = load_tokenizer(runtime.config.model)
    prompts = [(f"q{i}", tuple(tokenizer.encode(f"What is {i} + {i * 3}?", add_special_tokens=False)), str(4 * i))
               for i in range(1, 5)]
    jobs = contract_jobs(prompts, n_tier2=0)  # a random model's hinted samples are never correct: no Tier 2 here
    out = run_contract(runtime.pipeline, jobs, tmp_path / "cache")
    sources = {(c.perturbed, c.source) for p in out["first"] for c in p.candidates}
    assert sources == {(False, SOURCE_DECODE), (True, SOURCE_PREFILL)}, sources
    assert {c.source for p in out["wider"] for c in p.candidates} == {SOURCE_PREFILL}
    for name in ("first", "wider"):
        worst = worst_gap(out[name], jobs, runtime.scorer, runtime.engine.eos_token_ids)
        print(name, {s: f"{g:.1e}" for s, g in worst.items()})
        assert max(worst.values()) <= ATOL, worst


def test_a_vllm_server_that_goes_away_is_one_clear_status(probed, monkeypatch):
    """GetCandidates through a real gRPC server: served while vLLM answers; once it does not, the call fails with
    one status whose message names the vLLM server and the problem (not a hang, not a bare traceback)."""
    from brts.server.app import RunningServer
    from brts.shared.client import Prompt, TeacherClient

    runtime = probed[0]
    running = RunningServer(runtime.config, window_s=0.001).start().attach(runtime)
    client = TeacherClient(running.address, retries=0)
    try:
        prompt = Prompt("p", (1000, 2000, 3000), "7", n_tier1=2)
        (got,) = client.get_candidates([prompt], logprob_k=K_NARROW)
        assert len(got.candidates) == 2
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        monkeypatch.setattr(runtime.engine, "base_url", dead)
        with pytest.raises(grpc.RpcError) as err:
            list(client.get_candidates([Prompt("p", prompt.prompt_ids, "7", n_tier1=2, pool_offset=2)],
                                       logprob_k=K_NARROW))
    finally:
        client.close()
        running.service.close()
        running.server.stop(0).wait()
    status, message = err.value.code(), err.value.details()
    print(status, message)  # shown with -s
    assert status in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
    assert f"vllm server at {dead} is not reachable" in message and "\n" not in message
