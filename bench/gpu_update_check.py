"""One process, CUDA, bf16 compute / fp32 master weights: the trainer's own FSDP2 update (``brts.trainer.fsdp`` +
``brts.trainer.update``) for a few steps on a fixed batch; prints losses, step time, peak memory, dtypes.

    python bench/gpu_update_check.py --out update.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--seqs", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-4)
    args = p.parse_args()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from brts.trainer.fsdp import init_distributed, shard_student
    from brts.trainer.update import TrainSequence, UpdateConfig, Updater, make_optimizer

    info = init_distributed("cuda")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden,
                                         intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                                         num_attention_heads=8, num_key_value_heads=2,
                                         max_position_embeddings=4096, tie_word_embeddings=True))
    wrapper = shard_student(model, info, bf16=True, chunk_size=1024)
    opt = make_optimizer(wrapper, args.lr, (0.9, 0.999), 0.01)
    updater = Updater(wrapper, opt, UpdateConfig(token_budget=2 * args.length), info.device)
    g = torch.Generator().manual_seed(1)

    def seqs() -> list:
        out = []
        for _ in range(args.seqs):
            rows = args.length - 64
            ids = torch.randint(0, args.vocab, (rows, 16), generator=g)
            lp = torch.log_softmax(torch.randn(rows, 16, generator=g) * 3, -1).sort(-1, descending=True).values
            out.append(TrainSequence(torch.randint(0, args.vocab, (args.length,), generator=g), 64, ids, lp))
        return out

    sc, tc = seqs(), seqs()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rows = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        s = updater.step(sc, tc)
        torch.cuda.synchronize()
        rows.append({"loss": s.loss, "sc": s.student_context, "tc": s.teacher_context, "grad_norm": s.grad_norm,
                     "skipped": s.skipped, "seconds": time.perf_counter() - t0, "micro_batches": s.micro_batches})
        print(rows[-1], flush=True)
    dtypes = sorted({str(p.dtype) for p in wrapper.parameters()})
    result = {"device": torch.cuda.get_device_name(), "steps": rows, "param_dtypes": dtypes,
              "peak_gib_above_start": (torch.cuda.max_memory_allocated() - base) / 2**30,
              "tokens_per_step": 2 * args.seqs * (args.length - 64)}
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
