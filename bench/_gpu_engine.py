"""gpu_check section 1, the ``hf`` engine on a random tiny Qwen2 in bf16 (throughput, the EOS convention, a sample
alone vs in a batch), and the optional ``diag`` section that looks into the engine's timing and batch dependence.

See bench/gpu_check.py's docstring for what is checked and why.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Any

try:  # run as a script (bench/ on sys.path) or as bench.<name>
    from _gpu_common import gib, log, peak_above, reset_peak, sync, tiny_qwen2
except ImportError:  # pragma: no cover
    from bench._gpu_common import gib, log, peak_above, reset_peak, sync, tiny_qwen2


# ---------------------------------------------------------------------------------------------- 1. hf engine

def engine_setup(args: argparse.Namespace, dev: Any) -> tuple[Any, Any, Any, list, Any]:
    """The random tiny Qwen2 (CPU fp32 master copy and a bf16 copy on ``dev``), tokenizer, requests, sampling."""
    import torch

    from brts.shared.engines.base import GenerationRequest, SamplingParams
    from brts.shared.engines.hf import HFEngine
    from brts.shared.tokenizer import bundled_tokenizer_dir, load_tokenizer

    tok = load_tokenizer(bundled_tokenizer_dir())
    model = tiny_qwen2(args.vocab, args.gen_hidden, 4, 4, 2, 4096, seed=0)
    eos = HFEngine(model, tok).eos_token_ids  # only to read the EOS ids the engine derives
    # A random head makes every token ~1/V likely, so EOS would never come: give the EOS rows a large weight
    # vector so that EOS becomes likely at some positions (which depend on the context) and some samples stop.
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for e in eos:
            model.lm_head.weight[e] = (
                torch.randn(args.gen_hidden, generator=g) * args.eos_boost / math.sqrt(args.gen_hidden))
    model_bf16 = copy.deepcopy(model).to(device=dev, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(123)
    lengths = torch.randint(args.prompt_min, args.prompt_max + 1, (args.prompts,), generator=g).tolist()
    requests = [
        GenerationRequest(
            tuple(torch.randint(0, 151_643, (L,), generator=g).tolist()),
            tuple(1000 * i + j for j in range(args.samples)),
        )
        for i, L in enumerate(lengths)
    ]
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new_tokens)
    return model, model_bf16, tok, requests, sampling


def check_engine(args: argparse.Namespace, dev: Any, res: dict) -> dict:
    import torch

    from brts.shared.engines.base import SamplingParams
    from brts.shared.engines.hf import HFEngine

    model, model_bf16, tok, requests, sampling = engine_setup(args, dev)
    engine = HFEngine(model_bf16, tok)
    eos = engine.eos_token_ids
    out: dict[str, Any] = {
        "model": f"Qwen2ForCausalLM random, vocab {args.vocab}, hidden {args.gen_hidden}, "
                 "4 layers, 4 heads, 2 kv heads, bf16, sdpa",
        "eos_token_ids": list(eos),
        "engine_max_batch_size": engine.max_batch_size,
        "engine_max_batch_tokens": engine.max_batch_tokens,
    }
    res["engine"] = out
    n_prompts, n_samples, new = args.prompts, args.samples, args.new_tokens
    lengths = [len(r.prompt_ids) for r in requests]
    out.update(prompts=n_prompts, samples=n_samples, max_new_tokens=new, prompt_lengths=[min(lengths), max(lengths)],
               temperature=args.temperature, top_p=args.top_p)
    log(f"[1] hf engine: {n_prompts} prompts (lengths {min(lengths)}..{max(lengths)}) x {n_samples} samples x "
        f"{new} new tokens, T={args.temperature}, top_p={args.top_p}, eos={list(eos)}")

    # warm-up
    engine.generate(requests[:2], SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=8))
    base = reset_peak(dev)
    sync(dev)
    t0 = time.perf_counter()
    gens = engine.generate(requests, sampling)
    sync(dev)
    secs = time.perf_counter() - t0
    n_tok = sum(len(s.token_ids) for per in gens for s in per)
    out.update(seconds=secs, generated_tokens=n_tok, tokens_per_s=n_tok / secs, peak_alloc_bytes=peak_above(dev, base))
    log(f"    generate: {n_tok} tokens in {secs:.2f} s = {n_tok / secs:,.0f} tokens/s "
        f"(engine default max_batch_size={engine.max_batch_size}); "
        f"peak alloc above model {gib(out['peak_alloc_bytes'])}")

    # same call, one decode loop for all rows
    wide = HFEngine(model_bf16, tok, max_batch_size=n_prompts * n_samples, max_batch_tokens=1 << 30)
    sync(dev)
    t0 = time.perf_counter()
    gens_wide = wide.generate(requests, sampling)
    sync(dev)
    secs_w = time.perf_counter() - t0
    n_tok_w = sum(len(s.token_ids) for per in gens_wide for s in per)
    out.update(one_loop_seconds=secs_w, one_loop_tokens_per_s=n_tok_w / secs_w)
    log(f"    generate with max_batch_size={n_prompts * n_samples} (one loop): {n_tok_w / secs_w:,.0f} tokens/s")

    # EOS convention
    eos_set = set(eos)
    bad: list[str] = []
    n_stop = n_len = 0
    stop_lengths = []
    for i, per in enumerate(gens):
        if len(per) != n_samples:
            bad.append(f"request {i}: {len(per)} generations for {n_samples} seeds")
        for j, s in enumerate(per):
            ids = s.token_ids
            if s.finish_reason == "stop":
                n_stop += 1
                stop_lengths.append(len(ids))
                if not ids or ids[-1] not in eos_set:
                    bad.append(f"[{i}][{j}] stop without a final EOS")
                if any(t in eos_set for t in ids[:-1]):
                    bad.append(f"[{i}][{j}] stop with an EOS before the end")
                if len(ids) > new:
                    bad.append(f"[{i}][{j}] stop longer than max_new_tokens ({len(ids)})")
            elif s.finish_reason == "length":
                n_len += 1
                if len(ids) != new:
                    bad.append(f"[{i}][{j}] length with {len(ids)} != {new} tokens")
                if any(t in eos_set for t in ids):
                    bad.append(f"[{i}][{j}] length sample holds an EOS")
            else:
                bad.append(f"[{i}][{j}] finish_reason {s.finish_reason!r}")
            if any(not 0 <= t < engine.vocab_size for t in ids):
                bad.append(f"[{i}][{j}] token outside the vocabulary")
    out["eos_check"] = {
        "stop_samples": n_stop, "length_samples": n_len, "violations": len(bad), "first_violations": bad[:10],
        "stop_length_min_mean_max": (
            [min(stop_lengths), sum(stop_lengths) / len(stop_lengths), max(stop_lengths)] if stop_lengths else None),
    }  # fmt: skip
    log(f"    EOS convention: {n_stop} stop / {n_len} length samples, {len(bad)} violations"
        + (f": {bad[:3]}" if bad else " (every stop ends with exactly one EOS, none before; every length has "
           f"{new} tokens, no EOS)"))

    def same_share(a: list, b: list) -> dict:
        pairs = [(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb)]
        same = sum(x.token_ids == y.token_ids and x.finish_reason == y.finish_reason for x, y in pairs)
        first_div = []
        for x, y in pairs:
            if x.token_ids != y.token_ids:
                first_div.append(next((p for p, (u, v) in enumerate(zip(x.token_ids, y.token_ids)) if u != v),
                                      min(len(x.token_ids), len(y.token_ids))))
        return {"samples": len(pairs), "identical": same,
                "share_identical": same / len(pairs) if pairs else float("nan"),
                "first_divergence_min_mean": [min(first_div), sum(first_div) / len(first_div)] if first_div else None}

    # reproducibility: the whole batch again; a few requests alone; the one-loop batch
    rep = {"batch_again_vs_batch": same_share(engine.generate(requests, sampling), gens)}
    rep["one_loop_vs_default_groups"] = same_share(gens_wide, gens)
    idx = list(range(0, n_prompts, max(1, n_prompts // args.alone)))[: args.alone]
    alone = [engine.generate([requests[i]], sampling)[0] for i in idx]
    rep["alone_vs_batch"] = same_share(alone, [gens[i] for i in idx])
    rep["alone_again_vs_alone"] = same_share([engine.generate([requests[i]], sampling)[0] for i in idx], alone)
    # fp32 copy of the same weights, for comparison
    model_fp32 = copy.deepcopy(model).to(device=dev, dtype=torch.float32).eval()
    eng32 = HFEngine(model_fp32, tok)
    sub = [requests[i] for i in idx] + [requests[i] for i in range(n_prompts) if i not in idx][: args.alone]
    batch32 = eng32.generate(sub, sampling)
    alone32 = [eng32.generate([r], sampling)[0] for r in sub[: len(idx)]]
    rep["fp32_alone_vs_batch"] = same_share(alone32, batch32[: len(idx)])
    rep["fp32_vs_bf16_same_batch_position"] = same_share(alone32, alone)  # fp32 alone vs bf16 alone, same seeds
    # a peaked sampling distribution (top_k=20): a near-uniform random model flips a token on the smallest
    # rounding difference, so this shows whether that alone explains the batch-vs-alone differences
    peaked = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=20, max_new_tokens=new)
    sub16 = [requests[i] for i in idx]
    b16k = engine.generate(sub16 + [requests[i] for i in range(n_prompts) if i not in idx][: args.alone], peaked)
    rep["top_k20_bf16_alone_vs_batch"] = same_share([engine.generate([r], peaked)[0] for r in sub16], b16k[: len(idx)])
    b32k = eng32.generate(sub, peaked)
    rep["top_k20_fp32_alone_vs_batch"] = same_share(
        [eng32.generate([r], peaked)[0] for r in sub[: len(idx)]], b32k[: len(idx)])
    out["reproducibility"] = rep
    for key, v in rep.items():
        log(f"    reproducibility {key}: {v['identical']}/{v['samples']} identical ({100 * v['share_identical']:.0f}%)"
            + (f", first divergence at token {v['first_divergence_min_mean'][0]} "
               f"(mean {v['first_divergence_min_mean'][1]:.1f})"
               if v["first_divergence_min_mean"] else ""))
    del engine, wide, eng32, model_fp32
    return {"model_cpu": model, "tokenizer": tok}


# ---------------------------------------------------------------------------------------------- diag: engine

def diag_engine(args: argparse.Namespace, dev: Any, res: dict) -> None:
    """Where run-to-run differences of one and the same batch come from, and where a decode step's time goes.

    Records every ``_sample`` call (logits, uniforms, chosen ids) of two runs of the same batch: logits that differ
    mean a non-deterministic model forward; equal logits and uniforms with different ids mean a non-deterministic
    sampler. Then re-runs the sampler's pieces on fixed inputs, and times the forward and the sampler per step.
    """
    import torch

    from brts.shared.engines.hf import HFEngine

    out: dict[str, Any] = {}
    res["diag_engine"] = out
    _, model_bf16, tok, requests, sampling = engine_setup(args, dev)
    engine = HFEngine(model_bf16, tok)
    orig = HFEngine._sample
    rec: list = []
    timing = {"sample_s": 0.0, "calls": 0}

    def recorder(logits: Any, u: Any, sp: Any) -> Any:
        sync(dev)
        t0 = time.perf_counter()
        chosen = orig(logits, u, sp)
        sync(dev)
        timing["sample_s"] += time.perf_counter() - t0
        timing["calls"] += 1
        rec.append((logits.detach().clone(), u.detach().clone(), chosen.clone()))
        return chosen

    engine._sample = recorder  # instance attribute shadows the staticmethod; called as self._sample(...)
    req = requests[: max(1, 64 // args.samples)]  # exactly one default group of rows
    engine.generate(req[:1], sampling)
    rec.clear()
    runs = []
    for _ in range(3):
        sync(dev)
        t0 = time.perf_counter()
        gens = engine.generate(req, sampling)
        sync(dev)
        runs.append({"gens": gens, "rec": rec[:], "seconds": time.perf_counter() - t0})
        rec.clear()
    n_rows = sum(len(r.seeds) for r in req)
    steps = len(runs[0]["rec"])
    out.update(rows=n_rows, steps_run0=steps, seconds_per_run=[r["seconds"] for r in runs],
               sample_seconds_total_3_runs=timing["sample_s"], sample_calls=timing["calls"])
    log(f"[diag] one group of {n_rows} rows, {steps} steps/run: runs took {[round(r['seconds'], 2) for r in runs]} s; "
        f"_sample {1000 * timing['sample_s'] / max(1, timing['calls']):.1f} ms/step (synchronised) of "
        f"{1000 * sum(r['seconds'] for r in runs) / max(1, timing['calls']):.1f} ms/step")

    def first_difference(r0: list, r1: list) -> dict:
        for step, ((l0, u0, c0), (l1, u1, c1)) in enumerate(zip(r0, r1)):
            if l0.shape != l1.shape:
                return {"step": step, "kind": "batch shape differs (an earlier token differed)"}
            same_logits = torch.equal(l0, l1)
            same_u = torch.equal(u0, u1)
            if not same_logits or not same_u or not torch.equal(c0, c1):
                d = {"step": step, "logits_equal": same_logits, "u_equal": same_u, "chosen_equal": torch.equal(c0, c1)}
                if not same_logits:
                    d["logits_max_abs_diff"] = float((l0.float() - l1.float()).abs().max())
                    d["rows_with_logit_diff"] = int((l0 != l1).any(-1).sum())
                if same_logits and same_u:
                    d["rows_chosen_differ"] = int((c0 != c1).sum())
                    d["kind"] = "sampler non-deterministic on identical inputs"
                else:
                    d["kind"] = "model forward non-deterministic" if not same_logits else "uniforms differ"
                return d
        return {"step": None, "kind": "identical"}

    out["run1_vs_run0"] = first_difference(runs[0]["rec"], runs[1]["rec"])
    out["run2_vs_run0"] = first_difference(runs[0]["rec"], runs[2]["rec"])
    same = [sum(a.token_ids == b.token_ids for pa, pb in zip(runs[0]["gens"], r["gens"]) for a, b in zip(pa, pb))
            for r in runs[1:]]
    out["samples_identical_run1_run2_vs_run0"] = same
    log(f"    samples identical to run 0: {same} of {n_rows}; "
        f"first difference run1: {out['run1_vs_run0']}; run2: {out['run2_vs_run0']}")

    # the sampler and its pieces, repeated on fixed inputs (the prefill step of run 0 and a mid-run step)
    pieces: dict[str, Any] = {}
    for label, (logits, u, _) in (("step0", runs[0]["rec"][0]), ("mid", runs[0]["rec"][min(steps - 1, steps // 2)])):
        outs = [orig(logits, u, sampling) for _ in range(20)]
        x = logits.float() / sampling.temperature
        probs = torch.softmax(x, -1)
        sorts = [torch.sort(probs, dim=-1, descending=True) for _ in range(10)]
        tops = [torch.topk(probs, 64, dim=-1) for _ in range(10)]
        cums = [probs.double().cumsum(-1) for _ in range(10)]
        cumf = [probs.cumsum(-1) for _ in range(10)]
        ties = float((sorts[0].values[:, 1:] == sorts[0].values[:, :-1]).float().mean())
        pieces[label] = {
            "rows": int(logits.shape[0]), "logits_dtype": str(logits.dtype),
            "sample_repeat_all_equal": all(torch.equal(outs[0], o) for o in outs),
            "sample_repeat_rows_ever_differ": int(torch.stack([(o != outs[0]) for o in outs]).any(0).sum()),
            "sort_values_equal": all(torch.equal(sorts[0].values, s.values) for s in sorts),
            "sort_indices_equal": all(torch.equal(sorts[0].indices, s.indices) for s in sorts),
            "topk_indices_equal": all(torch.equal(tops[0].indices, t.indices) for t in tops),
            "cumsum_f64_equal": all(torch.equal(cums[0], c) for c in cums),
            "cumsum_f32_equal": all(torch.equal(cumf[0], c) for c in cumf),
            "adjacent_equal_share_in_sorted_probs": ties,
            "distinct_prob_values_row0": int(torch.unique(probs[0]).numel()),
        }
        # the same rows alone (batch of one) through the sampler: does the batch change a row's pick?
        alone = torch.cat([orig(logits[i : i + 1], u[i : i + 1], sampling) for i in range(logits.shape[0])])
        pieces[label]["sample_alone_vs_batched_rows_differ"] = int((alone != outs[0]).sum())
        # which piece depends on the batch: sort order of tied values, or the cumsum's rounding
        s_alone = [torch.sort(probs[i : i + 1], dim=-1, descending=True) for i in range(probs.shape[0])]
        pieces[label]["sort_indices_alone_vs_batched_rows_differ"] = sum(
            int(not torch.equal(s_alone[i].indices[0], sorts[0].indices[i])) for i in range(probs.shape[0]))
        pieces[label]["sort_values_alone_vs_batched_rows_differ"] = sum(
            int(not torch.equal(s_alone[i].values[0], sorts[0].values[i])) for i in range(probs.shape[0]))
        sv = sorts[0].values
        pieces[label]["cumsum_f32_alone_vs_batched_rows_differ"] = sum(
            int(not torch.equal(sv[i : i + 1].cumsum(-1)[0], sv.cumsum(-1)[i])) for i in range(sv.shape[0]))
        pieces[label]["cumsum_f64_alone_vs_batched_rows_differ"] = sum(
            int(not torch.equal(sv[i : i + 1].double().cumsum(-1)[0], sv.double().cumsum(-1)[i]))
            for i in range(sv.shape[0]))
        log(f"    sampler pieces on fixed inputs ({label}): {pieces[label]}")
    out["sampler_pieces"] = pieces

    # throughput of the full call (all prompts x samples), repeated: is the tokens/s figure stable?
    engine._sample = orig
    reps = []
    for _ in range(args.diag_gen_repeats):
        sync(dev)
        t0 = time.perf_counter()
        gens = engine.generate(requests, sampling)
        sync(dev)
        secs = time.perf_counter() - t0
        n_tok = sum(len(x.token_ids) for per in gens for x in per)
        reps.append({"seconds": secs, "tokens": n_tok, "tokens_per_s": n_tok / secs})
    out["full_call_repeats"] = reps
    log(f"    full call ({len(requests)} x {args.samples} x {args.new_tokens}) repeated: "
        f"{[round(r['tokens_per_s']) for r in reps]} tokens/s")

    # profile: a few decode steps of the whole group
    from torch.profiler import ProfilerActivity, profile

    engine._sample = orig
    short = type(sampling)(temperature=sampling.temperature, top_p=sampling.top_p, max_new_tokens=16)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        engine.generate(req, short)
        sync(dev)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    table_dev = prof.key_averages().table(sort_by=key, row_limit=14)
    table_cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=14)
    out["profile_16_steps_by_device_time"] = table_dev
    out["profile_16_steps_by_cpu_time"] = table_cpu
    log(f"    profile of {n_rows} rows x 16 new tokens, by {key}:\n{table_dev}\n    by cpu_time_total:\n{table_cpu}")
