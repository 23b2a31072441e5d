"""Probe: ``brts.trainer.rollout_vllm.VLLMRollouts`` itself in 2 torchrun ranks next to the trainer's gloo group.

    .venv/bin/python bench/vllm_rollout_probe/common.py        # once: saves the tiny model to /tmp
    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 \
        bench/vllm_rollout_probe/probe_rollouts_torchrun.py

Each rank: init gloo, start VLLMRollouts (external_launcher), sample 4 prompts x 4 seeds at T=1 x 32 tokens,
push different perturbed weights per rank (full HF state dict, as the trainer gathers it), check greedy tokens
equal transformers' on the pushed weights, all-reduce through the trainer's group, close, all-reduce again.
Prints one JSON line per rank with timings and RSS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable


def main() -> None:
    common.set_env()
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ref = common.build_model()
    rec: dict = {"rank": rank}
    t = common.Timer()
    from brts.trainer.rollout_vllm import VLLMRollouts

    eng = VLLMRollouts(common.MODEL_DIR, "cpu", torch.float32, max_model_len=256)
    rec["init_s"] = t.lap()
    rec["backend"] = eng._llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    rec["rss_gib"] = round(common.rss_gib(), 2)
    ps = common.prompts() + [[(i * 31 + 7) % 150000 for i in range(40)]]
    eng.generate(ps, [[1]] * len(ps), 8, 1.0)
    rec["warm_generate_s"] = t.lap()
    out = eng.generate(ps, [[1, 2, 3, 4]] * len(ps), 32, 1.0)
    rec["generate_16x32_s"] = t.lap()
    rec["tokens"] = sum(len(g.token_ids) for per in out for g in per)
    sd = common.perturbed_state_dict(ref, seed=100 + rank)
    t.lap()
    eng.push_weights(sd)
    rec["push_s"] = t.lap()
    greedy = [per[0].token_ids for per in eng.generate(ps, [[0]] * len(ps), 12, 0.0)]
    ref.load_state_dict(sd)
    rec["greedy_eq_hf_after_push"] = all(list(g) == common.hf_greedy(ref, p, len(g)) for g, p in zip(greedy, ps))
    x = torch.ones(2)
    dist.all_reduce(x)
    rec["allreduce_ok"] = x.tolist() == [2.0, 2.0]
    t.lap()
    eng.close()
    rec["close_s"] = t.lap()
    x = torch.ones(2)
    dist.all_reduce(x)
    rec["allreduce_after_close_ok"] = x.tolist() == [2.0, 2.0]
    rec["rss_after_close_gib"] = round(common.rss_gib(), 2)
    print("PROBE " + json.dumps(rec), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
