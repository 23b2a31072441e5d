"""Run by torchrun in tests/trainer/test_checkpoint.py: Updater steps on the tiny Qwen2 of update_worker.py with
checkpoints (at given steps, every k steps, on SIGTERM) and resume.

The "sampler" is a position into a fixed stream of global batches (batch seeds 100+pos / 200+pos): a resume that
lost it would train on other data. After each step every rank draws from torch, python ``random`` and numpy, so a
resume that lost the RNG states shows. ``--baseline-steps N`` first runs an uninterrupted N-step run in the same
processes (fresh model, no checkpoints) to compare with. Rank 0 writes to OUT (torch.save): per-step stats and
draws (all ranks), the full weights (fp32, or bf16 with ``--master-dtype bfloat16``) after loading, at
``--dump-at`` steps and at the end, the optimizer state's dtypes, the train state, whether it stopped on a signal,
and the error of a resume tried with another config (``--bad-config-resume``).
"""

import argparse
import dataclasses
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import Qwen2Config, Qwen2ForCausalLM
from update_worker import VOCAB, batch  # same directory (torchrun puts the script's directory on sys.path)

from brts.shared.config import TrainConfig
from brts.trainer.checkpoint import load_checkpoint, save_checkpoint
from brts.trainer.checkpoint_manager import SigtermCheckpointer
from brts.trainer.fsdp import DistInfo, init_distributed, shard_student
from brts.trainer.update import UpdateConfig, Updater, make_optimizer


def full_weights(wrapper):
    """Copies: at one rank the full state dict's tensors can alias the live parameters (nothing to gather)."""
    sd = get_model_state_dict(wrapper, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def run(args, info: DistInfo, stopper: SigtermCheckpointer, steps: int, resume: str | None, save_at: set[int],
        save_every: int, dump_at: set[int], sleep: float) -> dict:
    cfg = TrainConfig(student="tiny-qwen2", run_dir=args.run_dir, lr=1e-3, lam=0.5, token_budget=64,
                      max_steps=steps, save_every=save_every, master_dtype=args.master_dtype)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    wrapper = shard_student(model, info, bf16=False, chunk_size=16, master_dtype=cfg.master_dtype)
    opt = make_optimizer(wrapper, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    updater = Updater(wrapper, opt, UpdateConfig(lam=cfg.lam, grad_clip=cfg.grad_clip, token_budget=cfg.token_budget),
                      info.device)
    random.seed(1000 + info.rank)
    np.random.seed(1000 + info.rank)
    torch.manual_seed(1000 + info.rank)

    result: dict = {"stats": [], "draws": [], "dumps": {}, "world": info.world_size, "stopped": False}
    step, train_state = 0, {"sampler": {"position": 0}}
    if resume:
        if args.bad_config_resume:
            bad = dataclasses.replace(cfg, lr=2e-3, logprob_k=8, max_steps=7)  # max_steps may change, the others not
            try:
                load_checkpoint(resume, wrapper, opt, config_dict=bad.to_dict())
                result["bad_config_error"] = None
            except ValueError as exc:
                result["bad_config_error"] = str(exc)
        step, train_state = load_checkpoint(resume, wrapper, opt, config_dict=cfg.to_dict())
        result["resumed_step"], result["resumed_train_state"] = step, train_state
        result["loaded_weights"] = full_weights(wrapper)

    while step < steps:
        pos = train_state["sampler"]["position"]
        sc, tc = batch(100 + pos, 7), batch(200 + pos, 5)
        mine = lambda seqs: seqs[info.rank :: info.world_size]  # noqa: E731 - a one-line helper beside its one use
        stats = updater.step(mine(sc), mine(tc))
        draws = [float(torch.rand(1)), random.random(), float(np.random.rand())]
        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, draws)
        step += 1
        train_state = {"sampler": {"position": pos + 1}}
        result["stats"].append({"step": step, **stats.__dict__})
        result["draws"].append(gathered)
        if step in dump_at:
            result["dumps"][step] = full_weights(wrapper)
        saved = step in save_at or bool(save_every and step % save_every == 0)
        if saved:
            save_checkpoint(args.run_dir, step, wrapper, opt, train_state, cfg.to_dict())
        if args.progress and info.is_main:
            Path(args.progress).write_text(str(step))
        if stopper.should_stop():  # collective, every step
            if not saved:
                save_checkpoint(args.run_dir, step, wrapper, opt, train_state, cfg.to_dict())
            result["stopped"] = True
            break
        time.sleep(sleep)
    result["final_step"], result["train_state"] = step, train_state
    result["weights"] = full_weights(wrapper)
    result["optimizer_dtypes"] = sorted({str(v.dtype) for state in opt.state.values() for k, v in state.items()
                                         if torch.is_tensor(v) and k != "step"})
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--baseline-steps", type=int, default=0)
    ap.add_argument("--save-at", default="")
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--dump-at", default="")
    ap.add_argument("--resume", default=None)
    ap.add_argument("--bad-config-resume", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--progress", default=None)
    ap.add_argument("--master-dtype", default="float32")
    args = ap.parse_args()
    ints = lambda s: {int(x) for x in s.split(",") if x}  # noqa: E731 - a one-line parser kept beside its uses

    info = init_distributed("cpu")
    stopper = SigtermCheckpointer().install()
    out = {}
    if args.baseline_steps:
        out["baseline"] = run(args, info, stopper, args.baseline_steps, None, set(), 0, set(), 0.0)
    out["run"] = run(args, info, stopper, args.steps, args.resume, ints(args.save_at), args.save_every,
                     ints(args.dump_at), args.sleep)
    stopper.uninstall()
    if info.is_main:
        torch.save(out, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
