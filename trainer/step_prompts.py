"""A step's prompts as ids and as teacher requests, from the sampler's draws and the shared ``PromptSpec``.

Why one place: the launcher's cache check, every rank's prefetch and the step itself must build byte-identical
prompt ids and pool windows, or the teacher's cache would not be hit (design.md §4: the key is the ids).
Prompts longer than ``prompt.max_prompt_len`` are left out of their step (counted in the metrics), so the sampler
stays a pure function of the step and no up-front pass over the whole dataset is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, cast

from brts.shared.client import Prompt
from brts.shared.config import TrainConfig
from brts.shared.data import Problem
from brts.shared.prompts import PromptSpec
from brts.trainer.routing import check_routes, teacher_of
from brts.trainer.sampler import PromptDraw, PromptSampler, pool_offset

__all__ = ["StepPrompt", "build_step_prompts", "first_steps_requests", "prompt_spec_of", "teacher_requests",
           "teachers_of"]


@dataclass(frozen=True)
class StepPrompt:
    draw: PromptDraw
    problem: Problem
    ids: tuple[int, ...]

    @property
    def prompt_id(self) -> str:
        """Unique within a step even when a small dataset repeats a problem across an epoch boundary."""
        return f"{self.problem.id}@{self.draw.position}"


def prompt_spec_of(config: TrainConfig) -> PromptSpec:
    p = config.prompt
    return PromptSpec.from_options(
        p.tokenizer, p.chat_template, p.instruction_suffix, p.max_prompt_len, p.system_prompt
    )


def build_step_prompts(draws: Sequence[PromptDraw], problems: Sequence[Problem],
                       spec: PromptSpec) -> tuple[list[StepPrompt], int]:
    """(the draws' prompts that fit, how many did not)."""
    picked = [problems[d.item] for d in draws]
    ids = spec.encode_batch([p.problem for p in picked], check_length=False) if picked else []
    kept = [StepPrompt(d, p, tuple(i)) for d, p, i in zip(draws, picked, ids) if len(i) <= spec.max_prompt_len]
    return kept, len(draws) - len(kept)


def teacher_requests(prompts: Sequence[StepPrompt], config: TrainConfig, step: int) -> list[Prompt]:
    """GetCandidates requests: the pool window from the freshness policy, Tier 2 and perturbation from the config."""
    out = []
    for sp in prompts:
        offset = pool_offset(config.freshness, config.n_candidates, sp.draw.epoch, step)
        out.append(Prompt(sp.prompt_id, sp.ids, sp.problem.answer, config.n_candidates, config.n_tier2, offset,
                          config.perturbation or "", config.perturb_slot if config.perturbation else 0,
                          tier2_keep_leaked=config.tier2_keep_leaked, perturb_position=config.perturb_position))
    return out


def teachers_of(prompts: Sequence[StepPrompt], config: TrainConfig) -> list[str]:
    """Each prompt's teacher by its route (``trainer/routing.py``); the launcher has checked that all have one."""
    names = config.teacher_entries()
    check_routes([sp.problem for sp in prompts], names, config.teacher_route)
    return [cast(str, teacher_of(sp.problem.route, names)) for sp in prompts]  # every route has one, checked


def first_steps_requests(
    config: TrainConfig, problems: Sequence[Problem], spec: PromptSpec, steps: int
) -> dict[str, list[Prompt]]:
    """Every rank's requests of the first ``steps`` steps by teacher (for the launcher's cache check)."""
    sampler = PromptSampler(len(problems), config.prompts_per_step, config.seed)
    out: dict[str, list[Prompt]] = {}
    for step in range(min(steps, config.max_steps)):
        kept, _ = build_step_prompts(sampler.draw_all(step), problems, spec)
        for name, prompt in zip(teachers_of(kept, config), teacher_requests(kept, config, step)):
            out.setdefault(name, []).append(prompt)
    return out
