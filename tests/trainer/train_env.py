"""Helpers for the end-to-end training tests: a tiny student, a toy dataset, a config file, `brts train` runs.

The student is a random tiny Qwen2 with the full Qwen2.5 vocabulary, saved with the bundled tokenizer (the toy
teacher's), so the launcher's tokenizer and vocabulary checks pass for real. The dataset is the toy teacher's
arithmetic, and the config is the shipped tiny_cpu.yaml with the toy teacher's prompt format.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from server_proc import BRTS, ServerProcess, free_port  # noqa: E402,F401 - after the sys.path line; BRTS and free_port are re-exported to the tests

REPO = Path(__file__).resolve().parents[2]
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT: after a SIGTERM torchrun gives the ranks this long to finish their step and
# checkpoint before it SIGKILLs them; its default, 30 s, is less than one toy step plus a checkpoint can take on a
# loaded core, which would turn the SIGTERM tests' verdict into a race against the machine's speed.
TRAIN_ENV = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                 TORCH_ELASTIC_SHUTDOWN_TIMEOUT="600")
# Hang guards only (pytest-timeout backs them): a 3-step run takes about a minute on 2 idle cores.
HANG_S = 1200.0


def make_student(out: Path, seed: int = 0, tokenizer: Any | None = None) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from brts.shared.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=[151645, 151643])
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [151645, 151643]
    model.save_pretrained(out)
    (tokenizer or load_tokenizer("qwen2.5-instruct")).save_pretrained(out)
    return out


def write_problems(path: Path, n: int, seed: int = 0) -> Path:
    from brts.toy import make_problems

    with open(path, "w", encoding="utf-8") as f:
        for p in make_problems(n, seed=seed):
            f.write(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n")
    return path


def write_config(path: Path, **values: Any) -> Path:
    """tiny_cpu.yaml with the toy teacher's prompt format and ``values`` on top."""
    from brts.toy import TOY_CHAT_TEMPLATE

    data = yaml.safe_load((REPO / "trainer" / "configs" / "tiny_cpu.yaml").read_text())
    data["prompt"] = {"tokenizer": "qwen2.5-instruct", "chat_template": TOY_CHAT_TEMPLATE, "instruction_suffix": "",
                      "max_prompt_len": 256}
    data["sampling"]["max_new_tokens"] = 24
    data["max_steps"] = 3
    for key, value in values.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def train(*args: str, timeout: float = HANG_S) -> subprocess.CompletedProcess:
    return subprocess.run([*BRTS, "train", *args], capture_output=True, text=True, timeout=timeout, env=TRAIN_ENV,
                          cwd=REPO)


def start_train(*args: str, log: Path) -> subprocess.Popen:
    """A `brts train` in its own process group (so a test can kill -9 the launcher, torchrun and the ranks)."""
    return subprocess.Popen([*BRTS, "train", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=TRAIN_ENV,
                            cwd=REPO, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in sessions of their own, so a process-group kill
    would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_group(proc: subprocess.Popen) -> None:
    """kill -9 the launcher, torchrun and every rank at once."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = HANG_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"brts train exited ({proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} within {timeout} s")


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def server_counters(port: int) -> dict[str, float]:
    """A `brts serve`'s Prometheus counters (``--metrics-port``) as ``{"name{label=value}": value}``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out
