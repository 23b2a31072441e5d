"""The server under operations: security (TLS + token, non-loopback refusal) and a Score call that completes while
a long generation runs. Real `brts serve` subprocesses. kill -9 during a prewarm and restarts on the same cache are
tests/reliability/test_prewarm_kill.py (ten kills; it replaced the single-kill test that was here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_proc import BRTS, ServerProcess  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

from brts.shared.client import Prompt, Sampling, TeacherClient  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable
from brts.toy import make_problems, toy_prompt_spec  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable


def _brts(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*BRTS, *args], capture_output=True, text=True, timeout=timeout)


def test_non_loopback_bind_without_tls_and_token_refuses_to_start(tmp_path):
    r = _brts("serve", "--model", str(tmp_path), "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 1
    assert "host: binding 0.0.0.0 (not loopback) requires TLS and a bearer token" in r.stderr
    assert "tls_cert" in r.stderr and "token_file" in r.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls_and_bearer_token(toy_teacher_dir, tmp_path):
    cert, key, token_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "token"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    secret = "s3cret-token-value"
    token_file.write_text(secret + "\n")
    server = ServerProcess(toy_teacher_dir, tmp_path / "cache",
                           ["--tls-cert", str(cert), "--tls-key", str(key), "--token-file", str(token_file)])
    try:
        with TeacherClient(server.address, token=secret, tls_ca=str(cert)) as client:
            assert client.info.engine == "hf"
        for token in ("wrong", None):
            with pytest.raises(grpc.RpcError) as info:
                TeacherClient(server.address, token=token, tls_ca=str(cert))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(ConnectionError, match="not reachable"):  # plaintext against a TLS server
            TeacherClient(server.address, token=secret, connect_timeout_s=2)
    finally:
        server.stop()
    assert secret not in "\n".join(server.lines)


@pytest.fixture(scope="module")
def rambling_teacher(tmp_path_factory, qwen_tokenizer, tiny_qwen2_factory):
    """A random tiny Qwen2 with the full vocabulary: it never says EOS, so every sample runs to max_new_tokens."""
    folder = tmp_path_factory.mktemp("rambler")
    model = tiny_qwen2_factory(vocab_size=151_936, hidden_size=64, layers=2, max_positions=4096)
    model.generation_config.eos_token_id = [151645]
    model.save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    return folder


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc): an idle server's stays flat, a working one's grows."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_score_completes_while_a_long_generation_runs(rambling_teacher, tmp_path, qwen_tokenizer):
    """Score is answered while a generation runs, not queued behind it. By construction, not by the clock: the
    Score is sent once the server has spent CPU time on the generation request (it was idle before, so the
    generation is under way), and the generation is 3,900 sequential decoding steps against Score's one forward,
    so "the generation is still running when Score returns" holds on any machine unless Score waited for it. The
    server is then killed: nobody waits for the rest of the generation."""
    server = ServerProcess(rambling_teacher, tmp_path / "cache", ["sampling.max_new_tokens=3900", "batch_window_ms=5"])
    spec = toy_prompt_spec(qwen_tokenizer)
    prompts = [Prompt(p.id, tuple(spec.encode(p.problem)), p.answer, n_tier1=2) for p in make_problems(2, seed=5)]
    ended: list[BaseException | None] = []
    try:
        with TeacherClient(server.address, retries=0) as client:
            def generate():
                try:
                    list(client.get_candidates(prompts, Sampling(temperature=1.0), logprob_k=4))
                    ended.append(None)
                except grpc.RpcError as exc:  # the kill below ends the stream
                    ended.append(exc)

            idle = _cpu_seconds(server.proc.pid)
            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            deadline = time.monotonic() + 600  # a hang guard only
            while _cpu_seconds(server.proc.pid) < idle + 0.5:  # the server is working on the generation
                assert worker.is_alive() and time.monotonic() < deadline, ended
                time.sleep(0.01)
            seq = list(prompts[0].prompt_ids) + list(range(100, 400))
            (result,) = client.score([seq], [len(prompts[0].prompt_ids)], logprob_k=4)
            assert worker.is_alive() and not ended  # Score did not wait behind the generation
            assert result.topk_ids.shape == (300, 4)
            assert np.isfinite(result.topk_logprobs).all()
    finally:
        server.kill()
    worker.join(timeout=60)
    assert len(ended) == 1 and isinstance(ended[0], grpc.RpcError)  # the generation never finished: it was killed
