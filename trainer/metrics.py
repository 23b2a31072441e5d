"""Per-step metrics: summed over ranks, written by rank 0 to JSONL, TensorBoard (and W&B when asked), one console line.

Why sums: every rank counts its own prompts, rows and tokens; one all-reduce of a flat float64 vector of sums
(and maxima for times, the slowest rank is the step's time) gives exact global means, however the prompts fell.

Resume: ``MetricsWriter(..., resume_step=s)`` drops the lines of steps after ``s`` from ``metrics.jsonl`` (they were
logged by a run that crashed before its next checkpoint, and will be logged again), so the file never holds a step
twice; TensorBoard gets ``purge_step`` for the same reason.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

__all__ = ["MetricsWriter", "StepCounters", "reduce_counters"]

TIME_KEYS = ("rollout", "teacher_wait", "score_wait", "selection_forward", "student_topk", "update", "weight_push",
             "step")


class StepCounters:
    """Sums (``add``) and slowest-rank times (``time``) of one step on one rank."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.times: dict[str, float] = {k: 0.0 for k in TIME_KEYS}

    def add(self, key: str, value: float = 1.0) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def time(self, key: str, seconds: float) -> None:
        self.times[key] = self.times.get(key, 0.0) + seconds


SUM_KEYS = (
    "prompts", "prompts_too_long", "rows", "response_tokens", "rows_stopped", "tier1", "tier2", "tier3", "skip",
    "tier1_any_correct", "tier2_drawn", "tier2_rescued", "tier2_leaked", "cache_hits", "candidates",
    "chosen_overlap_sum", "chosen_overlap_n", "other_overlap_sum", "other_overlap_n", "ts_overlap_sum",
    "ts_overlap_n", "chosen_tokens", "chosen_n", "selection_sequences", "teacher_failures", "tc_ids_beyond_vocab",
    "candidates_beyond_vocab", "tier1_correct", "tier1_candidates",
)


#: Counted per teacher when a run has several (``teacher/NAME/...``, by the prompts' routes); their Score seconds
#: are ``time/score/NAME``. With a cross-teacher pool, also per teacher whose candidate was chosen (``chosen/NAME/``).
TEACHER_SUM_KEYS = ("prompts", "cache_hits", "tier1", "tier2", "tier3", "skip")
CHOSEN_SUM_KEYS = ("tier1", "tier2", "tier3", "overlap_sum", "overlap_n")


def teacher_keys(teachers: Sequence[str], pooled: bool = False) -> tuple[list[str], list[str]]:
    """The extra (sum, time) counter names of a run with several teachers (none for one: the totals say it)."""
    if len(teachers) < 2:
        return [], []
    sums = [f"teacher/{n}/{k}" for n in teachers for k in TEACHER_SUM_KEYS]
    if pooled:
        sums += [f"chosen/{n}/{k}" for n in teachers for k in CHOSEN_SUM_KEYS]
    return sums, [f"score/{n}" for n in teachers]


def reduce_counters(c: StepCounters, device: torch.device, teachers: Sequence[str] = (),
                    pooled: bool = False) -> dict[str, float]:
    """Global sums and max times (collective); every rank passes the same ``teachers`` (the config's)."""
    extra_sums, extra_times = teacher_keys(teachers, pooled)
    sum_keys, time_keys = (*SUM_KEYS, *extra_sums), (*TIME_KEYS, *extra_times)
    sums = torch.tensor([c.sums.get(k, 0.0) for k in sum_keys], dtype=torch.float64, device=device)
    times = torch.tensor([c.times.get(k, 0.0) for k in time_keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    out = dict(zip(sum_keys, sums.tolist()))
    out.update({f"time/{k}": v for k, v in zip(time_keys, times.tolist())})
    return out


def _teacher_metrics(g: Mapping[str, float]) -> dict[str, Any]:
    """Per teacher of a routed run: its prompts, cache hit rate and tier shares (its Score time is a time/ key)."""
    names = sorted({k.split("/")[1] for k in g if k.startswith("teacher/") and k.endswith("/prompts")})
    rec: dict[str, Any] = {}
    for n in names:
        t = {k: g[f"teacher/{n}/{k}"] for k in TEACHER_SUM_KEYS}
        decided = t["tier1"] + t["tier2"] + t["tier3"] + t["skip"]
        rec[f"teacher/{n}/prompts"] = int(t["prompts"])
        rec[f"teacher/{n}/cache_hit_rate"] = _ratio(t["cache_hits"], t["prompts"])
        rec.update({f"teacher/{n}/tier/{k.removeprefix('tier')}": _ratio(t[k], decided)
                    for k in ("tier1", "tier2", "tier3", "skip")})
    return rec


def _chosen_metrics(g: Mapping[str, float]) -> dict[str, Any]:
    """A cross-teacher pool's choices by the teacher that wrote the chosen candidate: its share of all choices and
    of each tier's, and the chosen candidates' overlap with the live student, per teacher."""
    names = sorted({k.split("/")[1] for k in g if k.startswith("chosen/") and k.endswith("/overlap_n")})
    tiers = {t: sum(g[f"chosen/{n}/tier{t}"] for n in names) for t in (1, 2, 3)}
    total = sum(tiers.values())
    rec: dict[str, Any] = {}
    for n in names:
        rec[f"chosen/{n}/share"] = _ratio(sum(g[f"chosen/{n}/tier{t}"] for t in (1, 2, 3)), total)
        rec.update({f"chosen/{n}/tier/{t}": _ratio(g[f"chosen/{n}/tier{t}"], tiers[t]) for t in (1, 2, 3)})
        rec[f"overlap/chosen/{n}"] = _ratio(g[f"chosen/{n}/overlap_sum"], g[f"chosen/{n}/overlap_n"])
    return rec


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _iid_catch_rate(correct: float, candidates: float, prompts: float) -> float | None:
    """1 − (1 − p)^N: the share of prompts with at least one correct Tier-1 candidate if the N candidates per prompt
    were independent draws at the step's per-candidate accuracy p (the paper's Fig. 5 compares the two)."""
    if not candidates or not prompts:
        return None
    p, n = correct / candidates, candidates / prompts
    return 1.0 - (1.0 - p) ** n


def step_metrics(step: int, g: Mapping[str, float], stats: Any, lr: float) -> dict[str, Any]:
    """The logged record of one step from the reduced counters and the update's ``StepStats``."""
    prompts = g["prompts"]
    decided = g["tier1"] + g["tier2"] + g["tier3"] + g["skip"]
    step_s = g["time/step"]
    rec: dict[str, Any] = {
        "step": step,
        "loss": stats.loss, "loss/student_context": stats.student_context,
        "loss/teacher_context": stats.teacher_context,
        "grad_norm": stats.grad_norm, "skipped_update": bool(stats.skipped), "lr": lr,
        "tokens/student_context": stats.sc_tokens, "tokens/teacher_context": stats.tc_tokens,
        "prompts": int(prompts), "prompts_too_long": int(g["prompts_too_long"]), "rows": int(g["rows"]),
        "tier/1": _ratio(g["tier1"], decided), "tier/2": _ratio(g["tier2"], decided),
        "tier/3": _ratio(g["tier3"], decided), "tier/skip": _ratio(g["skip"], decided),
        "tier1_any_correct": _ratio(g["tier1_any_correct"], prompts),
        # Fig. 5: the catch rate above against what N i.i.d. samples at the per-candidate accuracy p would give
        "tier1_candidate_accuracy": _ratio(g["tier1_correct"], g["tier1_candidates"]),
        "tier1_catch_rate_iid": _iid_catch_rate(g["tier1_correct"], g["tier1_candidates"], prompts),
        "tier2/drawn": int(g["tier2_drawn"]), "tier2/rescued": int(g["tier2_rescued"]),
        "tier2/leaked": int(g["tier2_leaked"]),
        "overlap/chosen": _ratio(g["chosen_overlap_sum"], g["chosen_overlap_n"]),
        "overlap/others": _ratio(g["other_overlap_sum"], g["other_overlap_n"]),
        "overlap/teacher_student_topk": _ratio(g["ts_overlap_sum"], g["ts_overlap_n"]),
        "length/rollout": _ratio(g["response_tokens"], g["rows"]),
        "length/chosen": _ratio(g["chosen_tokens"], g["chosen_n"]),
        "rollouts_stopped": _ratio(g["rows_stopped"], g["rows"]),
        "cache_hit_rate": _ratio(g["cache_hits"], prompts),
        "selection_sequences": int(g["selection_sequences"]),
        # a teacher wider than the student (issue #23): top-K ids and whole candidates the student has no logit for
        "teacher/topk_ids_beyond_student_vocab": int(g["tc_ids_beyond_vocab"]),
        "teacher/candidates_beyond_student_vocab": int(g["candidates_beyond_vocab"]),
        "tokens_per_s": _ratio(stats.sc_tokens + stats.tc_tokens + g["response_tokens"], step_s),
    }
    for key in ("sc_student_mass", "sc_teacher_mass", "tc_teacher_mass", "tc_student_mass"):  # issue #24
        value = getattr(stats, key, float("nan"))
        rec[key] = value if math.isfinite(value) else None
    rec.update(_teacher_metrics(g))
    rec.update(_chosen_metrics(g))
    rec.update({k: round(v, 4) for k, v in g.items() if k.startswith("time/")})
    return rec


def console_line(rec: Mapping[str, Any], max_steps: int) -> str:
    def f(key: str, fmt: str = ".3f") -> str:
        v = rec.get(key)
        return "-" if v is None else format(v, fmt)

    tiers = "/".join(f("tier/" + t, ".2f") for t in ("1", "2", "3", "skip"))
    return (f"step {rec['step']}/{max_steps} loss {f('loss', '.4f')} (sc {f('loss/student_context', '.4f')}, "
            f"tc {f('loss/teacher_context', '.4f')}) tiers {tiers} hit {f('cache_hit_rate', '.2f')} "
            f"len {f('length/rollout', '.1f')} {f('time/step', '.2f')}s (rollout {f('time/rollout', '.2f')}, "
            f"teacher {f('time/teacher_wait', '.2f')}, update {f('time/update', '.2f')})")


class MetricsWriter:
    """Rank 0's sinks: ``run_dir/metrics.jsonl``, ``run_dir/tb`` and optionally Weights & Biases."""

    def __init__(self, run_dir: str | os.PathLike[str], resume_step: int = 0, wandb_project: str | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print(
                    "brts train: wandb_project is set but wandb is not installed; logging to JSONL and TensorBoard only"
                )
            else:
                self._wandb = wandb.init(project=wandb_project, config=dict(config or {}), resume="allow")

    def write(self, rec: Mapping[str, Any]) -> None:
        line = dict(rec, time=round(time.time(), 3))
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        step = int(rec["step"])
        for key, value in rec.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self._tb.add_scalar(key, value, step)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if v is not None}, step=step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
