"""Student rollout engines: n samples per prompt at T=1 from the LIVE student, and the weight push after each step.

Why a second copy of the student: under FSDP2 every forward of the sharded model is a collective, and rollouts of
different lengths on different ranks would need the ranks to take the same number of decode steps. A rollout
engine holds its own unsharded copy of the weights (vLLM's model on GPU; an hf model here) and gets the new
weights after every optimizer step (``push_weights``: a full state dict, gathered collectively by the trainer).

Sampling is the shared hf engine (``make_engine("hf", ...)`` from ``brts.shared.engines``): per-sample seeds, so a
sample depends on its own seed only, whatever the batch; the trainer derives the seeds from (seed, step, prompt,
rollout), so a resumed run draws exactly the rollouts the uninterrupted one drew.

``make_rollout_engine(config.rollout_engine, ...)`` picks one; docs/rollouts.md says what runs where.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Protocol, Sequence

import torch

from brts.shared.engines.base import Generation, GenerationRequest, SamplingParams

__all__ = ["HFRollouts", "RolloutEngine", "make_rollout_engine"]


class RolloutEngine(Protocol):
    """What the training loop needs from a student sampler."""

    name: str

    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float) -> list[list[Generation]]:
        """Per prompt, one Generation per seed (in seed order); top_p=1, top_k off (brts-reference §2 step 2)."""
        ...

    def push_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the trainer's current full (unsharded) weights; names are the HF model's."""
        ...

    def sleep(self, level: int = 1) -> None:
        """Free what the engine holds on the device between rollouts (the loop calls it after ``generate``, so the
        student's forwards and the update get the memory); the next ``generate``/``push_weights`` takes it back."""
        ...

    def wake_up(self) -> None:
        """Take back everything ``sleep`` freed (``generate`` also does it by itself)."""
        ...

    def close(self) -> None: ...


class HFRollouts:
    """Rollouts from an in-process transformers copy of the student (any device; the CPU default)."""

    name = "hf"

    def __init__(self, model_dir: str | os.PathLike[str], device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32", tokenizer: Any | None = None, max_batch_size: int = 64) -> None:
        from brts.shared.engines import make_engine

        self._engine = make_engine("hf", model_dir, device=device, dtype=dtype, tokenizer=tokenizer,
                                   max_batch_size=max_batch_size)
        self.model = self._engine.model
        self.eos_token_ids = self._engine.eos_token_ids

    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float) -> list[list[Generation]]:
        if len(prompts) != len(seeds):
            raise ValueError(f"seeds: one list per prompt, got {len(seeds)} for {len(prompts)} prompts")
        requests = [
            GenerationRequest(tuple(int(t) for t in p), tuple(int(s) for s in sd)) for p, sd in zip(prompts, seeds)
        ]
        return self._engine.generate(requests, SamplingParams(temperature, 1.0, -1, max_new_tokens))

    @torch.no_grad()
    def push_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        missing = [k for k in own if k not in state_dict and not k.endswith("lm_head.weight")]
        if missing:
            raise KeyError(f"push_weights: the trainer's state dict lacks {missing[:3]} ({len(missing)} in all)")
        for name, tensor in own.items():
            src = state_dict.get(name)
            if src is None:  # a tied LM head: the embedding's copy already landed
                continue
            tensor.copy_(src.to(device=tensor.device, dtype=tensor.dtype))

    def sleep(self, level: int = 1) -> None:
        """No-op: an hf copy holds only its weights between calls (its KV cache lives inside ``generate``), and
        they must stay where they are for the next ``push_weights``; there is nothing to free."""

    def wake_up(self) -> None:
        """No-op: ``sleep`` freed nothing."""

    @property
    def engine(self) -> Any:
        """The generation engine on the live weights (in-training evaluation samples through it)."""
        return self._engine

    def close(self) -> None:
        self._engine.close()


def make_rollout_engine(name: str, model_dir: str | os.PathLike[str], device: torch.device, dtype: torch.dtype,
                        tokenizer: Any | None = None) -> RolloutEngine:
    """The configured engine (``rollout_engine``: hf | vllm) on this rank's device."""
    if name == "hf":
        return HFRollouts(model_dir, device, dtype, tokenizer)
    if name == "vllm":
        from brts.trainer.rollout_vllm import VLLMRollouts

        return VLLMRollouts(model_dir, device, dtype)
    raise ValueError(f"rollout_engine: must be one of hf, vllm; got {name!r}")
