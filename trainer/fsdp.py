"""Process group, device mesh and FSDP2 wrapping of the student (torchtitan's shape, one concern per function).

Why a wrapper module: the update needs the student's log-probs at GIVEN ids (its own top-K, the teacher's
top-K), never the T×V logits, so the forward ends in ``chunked_topk_logprobs`` on the final hidden states with
the LM head's weight. Running that inside the root FSDP module's forward is what makes FSDP2 unshard the root's
parameters (embeddings, final norm, LM head) for it and reshard them after, like any other layer.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from brts.trainer.topk_logprobs import chunked_topk_logprobs

# The wrapper's outputs are reshaped views of fresh tensors and nothing updates them in place (the losses are
# out-of-place), which is the case FSDP2's warning is about; silence it instead of paying a copy per forward.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join (or create, for one process) the default group: nccl on GPU, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank, dist.get_world_size(), dev)


class StudentLogProbs(nn.Module):
    """``forward`` → the student's log-probs at ``gather_ids`` [B, R, K] for the rows ``positions`` [B, R]
    (row r of sequence b is the hidden state at position ``positions[b, r]``, predicting the token after it)."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                gather_ids: torch.Tensor | None = None, k: int = 0) -> Any:
        """``k == 0``: the log-probs at ``gather_ids`` [B, R, K]. ``k > 0``: ``(topk_ids, topk_logprobs)`` [B, R, k]
        (the student's own top-K, for the no-grad forwards of the step); both go through ``forward`` so that
        FSDP2's hooks unshard the root's parameters either way."""
        # use_cache=False: Qwen2 takes it from its config (True) and would build a KV cache of every layer per forward
        hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        rows = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        head = self.model.get_output_embeddings()
        out = chunked_topk_logprobs(rows, head.weight, k=k, gather_ids=gather_ids, chunk_size=self.chunk_size,
                                    bias=getattr(head, "bias", None))
        return out.gathered_logprobs if k == 0 else (out.topk_ids, out.topk_logprobs)


def train_mode_without_dropout(model: nn.Module) -> list[str]:
    """Put the student in training mode with every dropout at 0; returns what was forced to 0 (to log).

    Why training mode: transformers checkpoints a decoder layer only when ``gradient_checkpointing and
    self.training``, and ``from_pretrained`` returns the model in eval mode, so without this
    ``activation_checkpointing: true`` silently kept every layer's activations (issue #23). Why dropout 0: the
    losses compare the student's log-probs with the teacher's at fixed ids, and the student's own top-K (a
    no-grad forward) must be the distribution the gradient forward differentiates; a random mask would make
    them two different models, and checkpointing's recomputation would draw a third. Qwen2 and the
    distilled-reasoning students have dropout 0 already; a model with dropout gets it set to 0 here and the
    caller logs the names.
    """
    forced: list[str] = []
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in config.to_dict().items():
            if ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, float) and value != 0.0:
                setattr(config, key, 0.0)
                forced.append(f"config.{key}={value}")
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p != 0.0:
            forced.append(f"{name or 'model'}.p={module.p}")
            module.p = 0.0
        for attr in ("attention_dropout", "dropout"):  # read from the config at init by attention modules
            value = getattr(module, attr, None)
            if isinstance(value, float) and value != 0.0:
                forced.append(f"{name or 'model'}.{attr}={value}")
                setattr(module, attr, 0.0)
    model.train()
    return forced


def shard_student(model: nn.Module, info: DistInfo, bf16: bool, activation_checkpointing: bool = False,
                  chunk_size: int = 1024, master_dtype: str = "float32") -> StudentLogProbs:
    """FSDP2 over the decoder layers and the root; bf16 compute when asked.

    ``master_dtype``: the dtype of the parameters, hence of their gradients and the AdamW state. float32 (the
    default) keeps small updates (lr 1e-6) from being rounded away; bfloat16 is what the authors' code runs
    (brts-reference §10 item 7) and is there to reproduce it. Gradients are reduced in fp32 either way.

    The gradient divide factor is 1: the losses are already divided by the all-reduced token count of the whole
    step, so the reduce-scatter must SUM the ranks' gradients, not average them (that would divide twice).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if master_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"master_dtype: must be float32 or bfloat16, got {master_dtype!r}")
    model = model.to(device=info.device, dtype=getattr(torch, master_dtype))
    forced = train_mode_without_dropout(model)
    if forced and info.is_main:
        print(f"brts train: student dropout set to 0 ({', '.join(forced)})", flush=True)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32)
    wrapper = StudentLogProbs(model, chunk_size)
    layers = getattr(model.model, "layers", [])
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(wrapper, mesh=mesh, mp_policy=policy)
    for module in [*layers, wrapper]:
        module.set_gradient_divide_factor(1.0)  # type: ignore[operator]
        module.set_force_sum_reduction_for_comms(True)  # type: ignore[operator] # plain SUM: gloo has no PREMUL_SUM
    return wrapper


def fsdp_modules(wrapper: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in wrapper.modules() if isinstance(m, FSDPModule)]
