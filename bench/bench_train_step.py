"""Training-step time with N = 1, 2, 4 teacher candidates on a warm cache, per overlap mode, side by side.

Why: BRTS's cost over plain OPD is choosing among N candidates every step. The paper regenerates them every
step (460 s vs 281 s per step for N=4 vs N=1, ratio 1.64); with the shared cache the candidates are read, not
generated, and what grows with N is only the selection: in ``position`` mode a comparison with the rollouts'
top-K (no forward), in ``prefix`` mode one no-grad student forward per contested candidate. Issue #8's goals on
tiny CPU models: step(4)/step(1) <= 1.10 (position) and <= 1.35 (prefix), and the selection-forward share.
And what the cache saves against the reference code's way: ``freshness: per_step`` moves the pool window every
step ([step·N, step·N + N)), so every step's candidates are fresh teacher generations, against ``cached`` (window
[0, N), prewarmed: every step a hit), both at N=4 in prefix mode (plus per_step at N=1, the paper's own ratio).

Setup, all real: a ``brts serve`` subprocess (the fitted toy teacher, hf engine, a fresh cache folder), this
process as a one-rank trainer (gloo, FSDP2, the hf rollout engine) running ``loop.StepRunner`` exactly as
``brts train`` does. Student: a random tiny Qwen2 with the full Qwen2.5 vocabulary (hidden 64, 2 layers, fp32).
The cache is warmed first by a pass at N=4 (its pool window [0, 4) contains those of N=1 and 2). Then for each
repeat, for each mode, for each N (interleaved, these machines are noisy): fresh student weights, ``--steps``
steps over the same prompts, the first one untimed; the table gives the median step time and its breakdown.
The regenerating passes (``regenerate`` in the table: prefix mode, freshness per_step, N=4 and N=1, their order
alternating per repeat) run right after prefix N=4, their warm counterpart, over the same steps and prompts; each
asks with a teacher sampling seed of its own (part of the pool key), so none of its windows was ever asked for
(asserted: a 0 % hit rate on every timed step). The runner prefetches step s+1's candidates while step s trains,
as ``brts train`` does, so the generation overlaps the step: what it still costs shows as teacher_wait and as CPU
taken from the rest of the step.

    .venv/bin/python bench/bench_train_step.py                 # ~6 min on 2 idle cores; --repeats 2: 17 min at load 4
    .venv/bin/python bench/bench_train_step.py --repeats 5 --prompts 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _rows import Row, emit
except ImportError:  # pragma: no cover
    from bench._rows import Row, emit

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "trainer"))


def _runner(config, problems, spec, info):
    import torch
    from transformers import AutoModelForCausalLM

    from brts.trainer.fsdp import shard_student
    from brts.trainer.loop import StepRunner, full_state_for_rollouts
    from brts.trainer.rollout import HFRollouts
    from brts.trainer.sampler import PromptSampler
    from brts.trainer.teacher_link import TeacherLink
    from brts.trainer.update import UpdateConfig, Updater, make_optimizer

    model = AutoModelForCausalLM.from_pretrained(config.student, dtype=torch.float32, local_files_only=True)
    wrapper = shard_student(model, info, bf16=False)
    optimizer = make_optimizer(wrapper, config.lr, tuple(config.betas), config.weight_decay)
    updater = Updater(wrapper, optimizer, UpdateConfig(config.lam, config.grad_clip, config.token_budget), info.device)
    rollouts = HFRollouts(config.student, "cpu", "float32", spec.tokenizer)
    rollouts.push_weights(full_state_for_rollouts(wrapper))
    link = TeacherLink(config)
    sampler = PromptSampler(len(problems), config.prompts_per_step, config.seed)
    return StepRunner(config, info.device, wrapper, updater, rollouts, link, sampler, problems, spec, True)


def _timed_pass(config, problems, spec, info, steps: list[int]) -> tuple[list[dict], str]:
    """A fresh runner (fresh student weights) over ``steps``; the timed records (all but the first) and a note."""
    t0 = time.perf_counter()
    runner = _runner(config, problems, spec, info)
    built = time.perf_counter() - t0
    recs = [runner.run_step(step) for step in steps]
    runner.link.close()
    first, recs = recs[0], recs[1:]
    note = (f"{statistics.median(r['time/step'] for r in recs):.3f} s/step (pass {time.perf_counter() - t0:.0f} s: "
            f"build {built:.1f} s, untimed first step {first['time/step']:.1f} s)")
    return recs, note


REGEN_SEED = 1000  # per_step passes: sampling seed REGEN_SEED + 10·repeat + N, never asked for before


def _report(results: dict[tuple[str, int], list[dict]], args: argparse.Namespace) -> dict:
    """Print the table of median step times, emit the rows; the summary."""
    keys = ("time/step", "time/rollout", "time/student_topk", "time/teacher_wait", "time/score_wait",
            "time/selection_forward", "time/update", "time/weight_push")
    print(f"\n{args.prompts} prompts x {args.rollouts} rollouts x {args.response_len} tokens per step, warm cache "
          f"(regenerate: prefix, freshness per_step), median over {args.repeats} x {args.steps - 1} timed steps "
          "(seconds)")
    print(f"{'mode':10} {'N':>2} " + " ".join(f"{k[5:]:>17}" for k in keys) + f" {'select share':>12}")
    summary = {}
    for (mode, n), recs in sorted(results.items()):
        med = {k: statistics.median(r[k] for r in recs) for k in keys}
        share = med["time/selection_forward"] / med["time/step"]
        summary[f"{mode}/{n}"] = {**med, "selection_share": share}
        print(f"{mode:10} {n:>2} " + " ".join(f"{med[k]:>17.3f}" for k in keys) + f" {share:>12.1%}")
    print()
    for mode, goal in (("position", 1.10), ("prefix", 1.35)):
        ratio = summary[f"{mode}/4"]["time/step"] / summary[f"{mode}/1"]["time/step"]
        summary[f"{mode}/ratio_4_1"] = ratio
        print(f"{mode}: step(4)/step(1) = {ratio:.3f} (goal <= {goal:.2f}; the paper's, regenerating: 1.64)")
        four, one = summary[f"{mode}/4"], summary[f"{mode}/1"]
        emit(Row("train_step", f"step time, warm cache, {mode} overlap (paper, regenerating: 1.64)",
                 "N=4 vs N=1 candidates", ratio, f"<= {goal:.2f}",
                 f"{four['time/step']:.2f} vs {one['time/step']:.2f} s",
                 {"step_s_n4": four["time/step"], "step_s_n1": one["time/step"],
                  "step_s_n2": summary[f"{mode}/2"]["time/step"], "timed_steps": args.repeats * (args.steps - 1)}))
    four = summary["prefix/4"]
    emit(Row("train_step", "selection-forward share of the step, prefix overlap, N=4", "selection forwards vs step",
             four["selection_share"], None, f"{four['time/selection_forward']:.2f} vs {four['time/step']:.2f} s",
             {"selection_s": four["time/selection_forward"], "step_s": four["time/step"]}))
    regen, warm, regen1 = summary["regenerate/4"], summary["prefix/4"], summary["regenerate/1"]
    ratio, ratio_41 = regen["time/step"] / warm["time/step"], regen["time/step"] / regen1["time/step"]
    summary["fresh/ratio_regen_warm"], summary["fresh/ratio_regen_4_1"] = ratio, ratio_41
    print(f"prefix N=4: regenerating every step (per_step) / warm cache (cached) = {ratio:.3f}; regenerating "
          f"N=4 / N=1 = {ratio_41:.3f} (the paper's: 1.64)")
    figures = {"regen_step_s_n4": regen["time/step"], "warm_step_s_n4": warm["time/step"],
               "regen_step_s_n1": regen1["time/step"], "regen_teacher_wait_s_n4": regen["time/teacher_wait"],
               "warm_teacher_wait_s_n4": warm["time/teacher_wait"], "timed_steps": args.repeats * (args.steps - 1)}
    emit(Row("train_step", "step time at N=4, prefix overlap: candidates regenerated every step vs a warm cache",
             "freshness per_step vs cached", ratio, None, f"{regen['time/step']:.2f} vs {warm['time/step']:.2f} s",
             figures),
         Row("train_step", "step time regenerating candidates every step, prefix overlap (paper: 1.64)",
             "N=4 vs N=1 candidates, freshness per_step", ratio_41, None,
             f"{regen['time/step']:.2f} vs {regen1['time/step']:.2f} s", figures))
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per pass; the first is not timed")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--rollouts", type=int, default=2, help="student rollouts per prompt")
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    from train_env import ServerProcess, make_student, write_config, write_problems

    from brts.shared.data import load_dataset
    from brts.toy import fit_toy_model
    from brts.trainer.config import load_train_config
    from brts.trainer.fsdp import init_distributed
    from brts.trainer.step_prompts import prompt_spec_of

    teacher = fit_toy_model(REPO / ".pytest_cache" / "d" / "toy-teacher", quality="teacher")
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    student = make_student(tmp / "student")
    data = write_problems(tmp / "problems.jsonl", 256, seed=3)
    server = ServerProcess(teacher, tmp / "cache")
    info = init_distributed("cpu")
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        def config(mode: str, n: int, regen_seed: int | None = None):
            # regen_seed: freshness per_step with a teacher sampling seed (part of the pool key) of its own
            fresh = {"freshness": "per_step"} if regen_seed is not None else {}
            sampling = {"max_new_tokens": args.response_len, **({"seed": regen_seed} if fresh else {})}
            path = write_config(tmp / f"{mode}-{n}-{regen_seed}.yaml", student=str(student), server=server.address,
                                dataset=str(data), run_dir=str(tmp / "run"), prompts_per_step=args.prompts,
                                n_rollouts=args.rollouts, max_response_len=args.response_len, n_candidates=n,
                                n_tier2=0, overlap_mode=mode, max_steps=args.steps, sampling=sampling, **fresh)
            return load_train_config(path)[0]

        problems = load_dataset(str(data))
        spec = prompt_spec_of(config("prefix", 4))
        warm = _runner(config("prefix", 4), problems, spec, info)
        for step in range(args.steps):
            warm.run_step(step)
        warm.link.close()
        for rep in range(args.repeats):
            for mode in ("position", "prefix"):
                for n in (1, 2, 4):
                    recs, note = _timed_pass(config(mode, n), problems, spec, info, list(range(args.steps)))
                    assert all(r["cache_hit_rate"] == 1.0 for r in recs), "the cache was not warm"
                    results.setdefault((mode, n), []).extend(recs)
                    print(f"repeat {rep + 1}/{args.repeats} {mode} N={n}: {note}", flush=True)
            for n in ((4, 1) if rep % 2 == 0 else (1, 4)):  # right after prefix N=4, its warm counterpart
                cfg = config("prefix", n, REGEN_SEED + 10 * rep + n)
                recs, note = _timed_pass(cfg, problems, spec, info, list(range(args.steps)))
                assert all(r["cache_hit_rate"] == 0.0 for r in recs), "per_step: a timed step hit the cache"
                results.setdefault(("regenerate", n), []).extend(recs)
                print(f"repeat {rep + 1}/{args.repeats} prefix, freshness per_step, N={n}: {note}", flush=True)
    finally:
        server.stop()

    summary = _report(results, args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
