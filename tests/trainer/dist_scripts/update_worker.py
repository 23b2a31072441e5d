"""Run by torchrun in tests/trainer/test_update_distributed.py: a few Updater steps on a fixed global batch.

Rank r takes sequences r, r + world, ... of the same global batch (uneven lengths across ranks); rank 0 writes
the per-step stats and the full fp32 weights to OUT (torch.save), so runs at different world sizes compare.
MODE ``nan`` makes step 2's gradient overflow; ``ac`` turns activation checkpointing on. Every mode also records
how often each decoder layer's MLP ran per step: a checkpointed layer runs it twice per micro-batch (the forward,
then the recomputation in backward), so the count tells whether checkpointing really happened.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import Qwen2Config, Qwen2ForCausalLM

from brts.trainer.fsdp import init_distributed, shard_student
from brts.trainer.update import TrainSequence, UpdateConfig, Updater, make_optimizer

VOCAB, K = 300, 6


def batch(seed: int, n: int) -> list[TrainSequence]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 40, (1,), generator=g))
        start = int(torch.randint(2, 5, (1,), generator=g))
        rows = length - start
        ids = torch.randint(0, VOCAB, (rows, K), generator=g)
        ids[:, -1] = torch.where(torch.rand(rows, generator=g) < 0.2, -1, ids[:, -1])  # some padding
        lp = torch.log_softmax(torch.randn(rows, K, generator=g) * 2, -1).sort(-1, descending=True).values
        lp = torch.where(ids < 0, torch.full_like(lp, float("-inf")), lp)
        out.append(TrainSequence(torch.randint(0, VOCAB, (length,), generator=g), start, ids, lp))
    return out


def main() -> None:
    out_path, steps, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    nonfinite = mode == "nan"
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    model.eval()  # as from_pretrained leaves it: shard_student must put it in training mode itself
    mlp_calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        # a PRE-hook: non-reentrant checkpointing stops its recomputation as soon as the last saved tensor is
        # rebuilt (inside the MLP), so a post-forward hook would not see the recomputation
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: mlp_calls.__setitem__(i, mlp_calls[i] + 1))
    wrapper = shard_student(model, info, bf16=False, activation_checkpointing=mode == "ac", chunk_size=16)
    opt = make_optimizer(wrapper, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    updater = Updater(wrapper, opt, UpdateConfig(lam=0.5, grad_clip=1.0, token_budget=64), info.device)
    stats, calls = [], []
    for step in range(steps):
        sc, tc = batch(100 + step, 7), batch(200 + step, 5)
        if nonfinite and step == 1:
            sc[0].teacher_logprobs[:, :] = -3.0e38  # finite, but its gradients overflow to inf
        mine = lambda seqs: seqs[info.rank :: info.world_size]  # noqa: E731 - a one-line helper beside its one use
        before = list(mlp_calls)
        stats.append(updater.step(mine(sc), mine(tc)).__dict__)
        calls.append([after - b for after, b in zip(mlp_calls, before)])
    weights = get_model_state_dict(wrapper, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        torch.save({"stats": stats, "weights": weights, "mlp_calls": calls, "training": model.training,
                    "checkpointing": bool(getattr(model.model, "gradient_checkpointing", False))}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
