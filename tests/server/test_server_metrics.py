"""Prometheus `/metrics` of a real `brts serve`: scraped with prometheus-client's own parser after real calls, every
counter moved by exactly what the calls did (requests by method and code, cache hits and misses, the coalescers'
items, candidates and tokens drawn, checked against the LMDB cache itself); no prompt ids in the text; a metrics
port in use or a non-loopback metrics bind without TLS ends the command with one line before the gRPC port."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parent))
from server_proc import BRTS, ServerProcess, free_port  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

from brts.proto import teacher_pb2, teacher_pb2_grpc  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.server.cache import admin  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.shared.client import Prompt, Sampling, TeacherClient  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.toy import make_problems, toy_prompt_spec  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable


def _scrape(port: int) -> tuple[str, dict[tuple[str, frozenset], float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read().decode()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counters_move_by_exactly_what_the_calls_did(toy_teacher_dir: Path, tmp_path: Path, qwen_tokenizer) -> None:
    metrics_port, cache = free_port(), tmp_path / "cache"
    server = ServerProcess(toy_teacher_dir, cache, ["--metrics-port", str(metrics_port),
                                                    "sampling.max_new_tokens=16", "sampling.temperature=1.0"])
    spec = toy_prompt_spec(qwen_tokenizer)
    prompts = [Prompt(p.id, tuple(spec.encode(p.problem)), p.answer, n_tier1=2, n_tier2=1)
               for p in make_problems(3, seed=11)]
    try:
        _, before = _scrape(metrics_port)
        with TeacherClient(server.address) as client:  # one Info call
            drawn = list(client.get_candidates(prompts, Sampling(), logprob_k=4))
            again = list(client.get_candidates(prompts, Sampling(), logprob_k=4))
            seq = list(prompts[0].prompt_ids) + list(range(100, 120))
            for _ in range(2):
                client.score([seq], [len(prompts[0].prompt_ids)], logprob_k=4)
        with grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError) as bad:
                teacher_pb2_grpc.TeacherServiceStub(channel).Score(teacher_pb2.ScoreRequest(logprob_k=4), timeout=60)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        text, after = _scrape(metrics_port)
        stored = admin.stats(cache)  # what this server drew, as the cache holds it (it started empty)
    finally:
        server.stop()
    assert not any(v for (name, _), v in before.items() if name.startswith("brts_") and name.endswith("_total"))
    assert all(not c.cached for p in drawn for c in p.candidates) and all(p.cache_hit for p in again)
    calls = {("Info", "OK"): 1, ("GetCandidates", "OK"): 2, ("Score", "OK"): 2, ("Score", "INVALID_ARGUMENT"): 1}
    for (method, code), n in calls.items():
        assert _value(after, "brts_requests_total", method=method, code=code) == n, (method, code)
    assert sum(v for (name, _), v in after.items() if name == "brts_requests_total") == sum(calls.values())
    for method in ("Info", "GetCandidates", "Score"):
        assert _value(after, "brts_request_seconds_count", method=method) == sum(
            n for (m, _), n in calls.items() if m == method)
        assert _value(after, "brts_requests_in_flight", method=method) == 0
    assert _value(after, "brts_prompts_total", result="miss") == 3
    assert _value(after, "brts_prompts_total", result="hit") == 3
    # the coalescers: the 3 missing prompts in the candidates queue, the 2 valid Score items in the score queue
    assert _value(after, "brts_batch_items_sum", queue="candidates") == 3
    assert _value(after, "brts_batch_items_sum", queue="score") == 2
    assert (
        _value(after, "brts_queue_depth", queue="candidates") == _value(after, "brts_queue_depth", queue="score") == 0
    )
    (row,) = stored["teachers"].values()
    tier1 = _value(after, "brts_candidates_generated_total", tier="1")
    tier2 = _value(after, "brts_candidates_generated_total", tier="2")
    assert tier1 == row["entries_tier1"] == 6 and tier2 == row.get("entries_tier2", 0)
    assert _value(after, "brts_tokens_generated_total") == row["tokens"]
    assert _value(after, "brts_tier2_total", event="attempt") == tier2 == sum(p.tier2_drawn for p in drawn)
    assert _value(after, "brts_tier2_total", event="leak") == sum(p.tier2_leaked for p in drawn)
    outcomes = sum(_value(after, "brts_tier2_total", event=e) for e in ("rescue", "leak", "wrong"))
    assert outcomes == tier2
    assert _value(after, "brts_engine_seconds_total") > 0 and _value(after, "brts_scorer_seconds_total") > 0
    assert not any(p.prompt_id in text for p in prompts)  # counters only: no prompt names


def _serve_refused(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BRTS, "serve", *args], capture_output=True, text=True, timeout=600)


def test_a_metrics_port_in_use_fails_before_the_grpc_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _serve_refused("--model", str(tmp_path), "--port", "0", "--metrics-port", str(port))
    assert r.returncode == 1 and "bound" not in r.stdout, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"brts serve: metrics_port: cannot serve metrics on 127.0.0.1:{port}"
    )


def test_a_non_loopback_metrics_bind_needs_tls(tmp_path: Path) -> None:
    r = _serve_refused("--model", str(tmp_path), "--port", "0", "--metrics-port", "9464", "--metrics-host", "0.0.0.0")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "brts serve: server.metrics_host: serving metrics on 0.0.0.0 (not loopback) requires TLS; set tls_cert and "
        "tls_key (the server's certificate serves the metrics too)"]
