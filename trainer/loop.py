"""The BRTS training loop on every rank (design.md §6): rollouts, teacher, selection, dual-branch update, push.

Order of one step s on a rank, and why:
1. its prompts (``PromptSampler``: pure in (seed, s)); GetCandidates for step s+1 is sent now, so the teacher
   generates/reads while this step trains;
2. n student rollouts per prompt at T=1 (the rollout engine, seeded from (seed, s, prompt position, j));
3. the student's no-grad top-K along them (FSDP model, collective), each micro-batch's ``Score`` sent at once;
4. candidates of step s (prefetched), then the choice per prompt (``prefix``: the student's forward on the
   contested candidates; ``position``: its rollout top-K, per row) by correctness first, overlap second;
5. the update on L_SC (rollouts, teacher log-probs at the student's top-K) + λ·L_TC (chosen trajectory, the
   teacher's cached top-K), token means over the whole step (``update.Updater``);
6. the new weights to the rollout engine and the step's metrics; the evaluation, checkpoint and SIGTERM check
   around the step are ``trainer.Trainer``'s.
With several teachers (``teachers:``), each prompt's GetCandidates and each rollout's Score go to the prompt's
teacher (``trainer/routing.py``); everything else is the same for every prompt. A teacher that stays unreachable
after the client's retries (``TeacherDown``, agreed across ranks, naming it) ends the run with a checkpoint of the
last finished step, so ``brts train --resume`` continues exactly there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from brts.shared.config import TrainConfig
from brts.trainer.metrics import StepCounters, reduce_counters, step_metrics
from brts.trainer.rollout import RolloutEngine
from brts.trainer.sampler import PromptSampler, keyed_seed
from brts.trainer.selection import Choice, Key, Pool, choose_position, choose_prefix, topk_overlap, valid_rows
from brts.trainer.step_prompts import StepPrompt, build_step_prompts, teacher_requests, teachers_of
from brts.trainer.student_forward import iter_student_topk, student_topk
from brts.trainer.teacher_link import Routed, TeacherDown, TeacherLink
from brts.trainer.update import TrainSequence, Updater, teacher_rows_for_student

__all__ = ["EXIT_FAILED", "EXIT_TEACHER_DOWN", "StepRunner", "TrainError", "full_state_for_rollouts"]

# The exit codes of a run that ends on an error: 1 for one the user fixes (config, data, a different teacher),
# 3 for a teacher that went away mid-run (a checkpoint of the last finished step was written: resume it).
EXIT_FAILED, EXIT_TEACHER_DOWN = 1, 3


class TrainError(RuntimeError):
    """Ends the run with one line and ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _agree_down(down: TeacherDown | None, teachers: list[str], device: torch.device) -> list[str]:
    """The teachers that failed on any rank (a MAX all-reduce of one flag per teacher), so all ranks stop at the
    same point and rank 0 can name a teacher that failed elsewhere."""
    t = torch.zeros(len(teachers), dtype=torch.int32, device=device)
    if down is not None:
        t[teachers.index(down.teacher)] = 1
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [name for name, flag in zip(teachers, t.tolist()) if flag]


def teacher_down_error(failed: list[str], down: TeacherDown | None, addresses: dict[str, str],
                       run_dir: str) -> TrainError:
    """The run's last line for a teacher outage: which teacher(s), where, what this rank saw, how to go on."""
    which = ", ".join(f"{n} at {addresses[n]}" for n in failed)
    why = str(down) if down is not None else "on another rank"
    return TrainError(f"teacher server {which} stopped answering ({why}); restart its `brts serve` and resume with "
                      f"`brts train --resume {run_dir}`", exit_code=EXIT_TEACHER_DOWN)


def full_state_for_rollouts(wrapper: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student's full weights under HF names (collective: every rank gathers them for its own engine)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(wrapper, options=StateDictOptions(full_state_dict=True))
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}


@dataclass
class _Row:
    prompt: int  # index into the step's prompts on this rank
    token_ids: tuple[int, ...]
    stopped: bool


def _rows_by_prompt(rows: list[_Row]) -> dict[int, list[int]]:
    """Per prompt index, the indices of its rollout rows (in row order)."""
    rows_of: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        rows_of.setdefault(r.prompt, []).append(i)
    return rows_of


@dataclass
class StepRunner:
    """Everything one rank needs to run steps; ``run_step(s)`` → the logged record (rank 0) or None."""

    config: TrainConfig
    device: torch.device
    wrapper: torch.nn.Module
    updater: Updater
    rollouts: RolloutEngine
    link: TeacherLink
    sampler: PromptSampler
    problems: list[Any]
    spec: Any
    is_main: bool
    pending: dict[int, Routed] = field(default_factory=dict)
    _prompts: dict[int, tuple[list[StepPrompt], int]] = field(default_factory=dict)

    @property
    def student_vocab(self) -> int:
        """The student's logits dimension (its LM head's rows; the global shape under FSDP2)."""
        return int(self.wrapper.model.get_output_embeddings().weight.shape[0])

    # ------------------------------------------------------------------ prompts and prefetch

    def prompts(self, step: int) -> tuple[list[StepPrompt], int]:
        if step not in self._prompts:
            self._prompts[step] = build_step_prompts(self.sampler.draw(step), self.problems, self.spec)
            for old in [s for s in self._prompts if s < step - 1]:
                del self._prompts[old]
        return self._prompts[step]

    @property
    def teachers(self) -> list[str]:
        """The run's teacher names, the same on every rank (the order of the per-teacher flags and counters)."""
        return list(self.link.entries)

    def request_candidates(self, step: int) -> None:
        if self.config.teacher_branch and step < self.config.max_steps and step not in self.pending:
            prompts = self.prompts(step)[0]
            self.pending[step] = self.link.candidates(teacher_requests(prompts, self.config, step),
                                                      teachers_of(prompts, self.config))

    # ------------------------------------------------------------------ one step

    def run_step(self, step: int) -> dict[str, Any] | None:
        cfg, c = self.config, StepCounters()
        t_step = time.perf_counter()
        prompts, too_long = self.prompts(step)
        c.add("prompts", len(prompts))
        c.add("prompts_too_long", too_long)
        self.request_candidates(step)
        self.request_candidates(step + 1)

        t = time.perf_counter()
        seeds = [[keyed_seed(cfg.seed, "rollout", step, sp.draw.position, j) for j in range(cfg.n_rollouts)]
                 for sp in prompts]
        gens = self.rollouts.generate([sp.ids for sp in prompts], seeds, cfg.max_response_len, cfg.rollout_temperature)
        rows = [_Row(p, tuple(g.token_ids), g.finish_reason == "stop") for p, per in enumerate(gens) for g in per]
        self.rollouts.sleep(1)  # vLLM on GPU: weights to host, KV cache freed for the forwards and the update
        c.time("rollout", time.perf_counter() - t)
        c.add("rows", len(rows))
        c.add("response_tokens", sum(len(r.token_ids) for r in rows))
        c.add("rows_stopped", sum(r.stopped for r in rows))
        rows_of = _rows_by_prompt(rows)

        # the student's top-K along its rollouts; each micro-batch's Score goes out as soon as it exists
        t = time.perf_counter()
        seqs = [prompts[r.prompt].ids + r.token_ids for r in rows]
        starts = [len(prompts[r.prompt].ids) for r in rows]
        routes = teachers_of(prompts, cfg)  # each row is scored by its prompt's teacher
        rollout_topk: list[Any] = [None] * len(rows)
        scores: list[tuple[list[int], Routed]] = []
        for batch, got in iter_student_topk(self.wrapper, seqs, starts, cfg.logprob_k, cfg.token_budget, self.device):
            for i, rows_topk in zip(batch, got):
                rollout_topk[i] = rows_topk
            scores.append((batch, self.link.score([seqs[i] for i in batch], [starts[i] for i in batch],
                                                  [got[b][0].numpy().astype("int32") for b in range(len(batch))],
                                                  cfg.logprob_k, [routes[rows[i].prompt] for i in batch])))
        c.time("student_topk", time.perf_counter() - t)

        choices, down, failed = self._select(step, prompts, rows_of, rollout_topk, routes, c)
        sc: list[TrainSequence] = []
        if not failed:
            t = time.perf_counter()
            try:
                sc = self._student_context(scores, seqs, starts, rollout_topk, c)
            except TeacherDown as exc:
                down = exc
            c.time("score_wait", time.perf_counter() - t)
            failed = _agree_down(down, self.teachers, self.device)
        if failed:
            raise teacher_down_error(failed, down, self.link.addresses, cfg.run_dir)
        for name, seconds in self.link.take_score_seconds().items():
            c.time(f"score/{name}", seconds)
        tc = self._teacher_sequences(prompts, rows, rows_of, choices, c)

        t = time.perf_counter()
        stats = self.updater.step(sc, tc)
        c.time("update", time.perf_counter() - t)
        t = time.perf_counter()
        self.rollouts.push_weights(full_state_for_rollouts(self.wrapper))
        c.time("weight_push", time.perf_counter() - t)
        c.time("step", time.perf_counter() - t_step)
        g = reduce_counters(c, self.device, self.teachers, bool(cfg.candidate_teachers))
        if not self.is_main:
            return None
        lr = self.updater.optimizer.param_groups[0]["lr"]
        return step_metrics(step + 1, g, stats, lr)

    # ------------------------------------------------------------------ selection

    def _student_context(self, scores: list[tuple[list[int], Routed]], seqs: list[tuple[int, ...]],
                         starts: list[int], rollout_topk: list[Any], c: StepCounters) -> list[TrainSequence]:
        """The student-context branch: each rollout with its teacher's log-probs at the student's top-K."""
        out = []
        for batch, routed in scores:
            for i, res in zip(batch, routed.wait("Score")):
                ids = rollout_topk[i][0]
                out.append(TrainSequence(torch.tensor(seqs[i], dtype=torch.long), starts[i], ids,
                                         torch.from_numpy(res.candidate_logprobs.astype("float32"))))
                c.add("ts_overlap_sum", topk_overlap(ids, res.topk_ids))
                c.add("ts_overlap_n")
        return out

    def _select(self, step: int, prompts: list[StepPrompt], rows_of: dict[int, list[int]], rollout_topk: list[Any],
                routes: list[str], c: StepCounters) -> tuple[dict[int, list[Choice]], TeacherDown | None, list[str]]:
        """Per prompt, one Choice per row; (choices, this rank's failure, the teachers that failed on any rank).
        Collective in ``prefix`` mode (the student's forward on candidates), so every rank calls it; when a
        teacher failed on any rank, every rank returns before that forward."""
        cfg = self.config
        if not cfg.teacher_branch:
            return {}, None, []
        t = time.perf_counter()
        down, answers = None, []
        try:
            answers = self.pending.pop(step).wait("GetCandidates")
        except TeacherDown as exc:
            down = exc
        c.time("teacher_wait", time.perf_counter() - t)
        failed = _agree_down(down, self.teachers, self.device)
        if failed:
            return {}, down, failed
        pools = [self._pool(res, c) for res in answers]
        # a cross-teacher pool's ties: a seeded draw per (seed, step, prompt), never the teachers' listing order
        ties = [keyed_seed(cfg.seed, "tie", step, sp.draw.position) if cfg.candidate_teachers else None
                for sp in prompts]
        t = time.perf_counter()
        if cfg.overlap_mode == "position":
            choices = {p: choose_position(pool, [rollout_topk[i][0] for i in rows_of.get(p, [])], cfg.tier3, ties[p])
                       for p, pool in enumerate(pools)}
        else:
            choices = self._choose_prefix(prompts, pools, rows_of, ties, c)
        c.time("selection_forward", time.perf_counter() - t)
        several = len(self.teachers) > 1
        for p, per in choices.items():
            for ch in per:
                tier = {1: "tier1", 2: "tier2", 3: "tier3", None: "skip"}[ch.tier]
                c.add(tier)
                if several:
                    c.add(f"teacher/{routes[p]}/{tier}")
                if cfg.candidate_teachers and ch.candidate is not None:
                    self._count_chosen(ch, tier, c)
                if ch.overlap is not None:
                    c.add("chosen_overlap_sum", ch.overlap)
                    c.add("chosen_overlap_n")
                c.add("other_overlap_sum", sum(ch.others))
                c.add("other_overlap_n", len(ch.others))
        if several:
            for res, name in zip(answers, routes):
                c.add(f"teacher/{name}/prompts")
                c.add(f"teacher/{name}/cache_hits", res.cache_hit)
        return choices, None, []

    @staticmethod
    def _count_chosen(ch: Choice, tier: str, c: StepCounters) -> None:
        """A cross-teacher pool's choice, by the teacher that wrote the chosen candidate (its client-side tag)."""
        teacher = ch.candidate.teacher
        c.add(f"chosen/{teacher}/{tier}")
        if ch.overlap is not None:
            c.add(f"chosen/{teacher}/overlap_sum", ch.overlap)
            c.add(f"chosen/{teacher}/overlap_n")

    def _pool(self, res: Any, c: StepCounters) -> Pool:
        """A prompt's candidates as a Pool, counted. A candidate with a token the student has no embedding for (a
        wider teacher's padding id) can be neither scored by the student nor trained on: it leaves the pool."""
        vocab = self.student_vocab
        usable = [x for x in res.candidates if x.token_ids.size == 0 or int(x.token_ids.max()) < vocab]
        c.add("candidates_beyond_vocab", len(res.candidates) - len(usable))
        pool = Pool.of(usable)
        c.add("cache_hits", res.cache_hit)
        c.add("candidates", len(res.candidates))
        c.add("tier1_any_correct", any(x.correct for x in pool.tier1))
        c.add("tier1_correct", sum(x.correct for x in pool.tier1))
        c.add("tier1_candidates", len(pool.tier1))
        c.add("tier2_drawn", res.tier2_drawn > 0)
        c.add("tier2_rescued", any(x.correct for x in pool.tier2))
        c.add("tier2_leaked", res.tier2_leaked)
        return pool

    def _choose_prefix(self, prompts: list[StepPrompt], pools: list[Pool], rows_of: dict[int, list[int]],
                       ties: list[int | None], c: StepCounters) -> dict[int, list[Choice]]:
        """``prefix`` mode: the student's top-K along each contested candidate after the ORIGINAL prompt (one
        collective forward for all of them), then one choice per prompt, shared by its rows."""
        cfg = self.config
        wanted = [(p, key) for p, pool in enumerate(pools) for key in pool.contested(cfg.tier3)]
        cands = [pools[p].candidate(key) for p, key in wanted]
        topk = student_topk(self.wrapper, [prompts[p].ids + tuple(int(x) for x in cand.token_ids)
                                           for (p, _), cand in zip(wanted, cands)],
                            [len(prompts[p].ids) for p, _ in wanted], cfg.logprob_k, cfg.token_budget, self.device)
        c.add("selection_sequences", len(wanted))
        by_prompt: dict[int, dict[Key, torch.Tensor]] = {}
        for (p, key), (ids, _) in zip(wanted, topk):
            by_prompt.setdefault(p, {})[key] = ids
        return {p: [choose_prefix(pool, by_prompt.get(p, {}), cfg.tier3, ties[p])] * len(rows_of.get(p, []))
                for p, pool in enumerate(pools)}

    def _teacher_sequences(self, prompts: list[StepPrompt], rows: list[_Row], rows_of: dict[int, list[int]],
                           choices: dict[int, list[Choice]], c: StepCounters) -> list[TrainSequence]:
        """The teacher-context branch: the chosen trajectory after the ORIGINAL prompt, the teacher's cached top-K.

        One sequence per prompt when every row of it shares the choice and nothing is truncated (the same loss as
        repeating it per row: each prompt has n rows, so the token mean is unchanged); else one per row."""
        cfg = self.config
        out: list[TrainSequence] = []
        per_prompt = cfg.overlap_mode == "prefix" and not cfg.truncate_to_student
        for p, per in choices.items():
            targets = list(zip(per[:1], [None])) if per_prompt else \
                [(ch, len(rows[i].token_ids) if cfg.truncate_to_student else None) for ch, i in zip(per, rows_of[p])]
            for ch, keep in targets:
                cand = ch.candidate
                if cand is None or cand.topk_ids is None or len(cand.token_ids) == 0:
                    continue
                ids = tuple(int(x) for x in cand.token_ids)
                c.add("chosen_tokens", len(ids))
                c.add("chosen_n")
                topk_ids, topk_lps, beyond = teacher_rows_for_student(cand.topk_ids, cand.topk_logprobs,
                                                                      self.student_vocab)
                c.add("tc_ids_beyond_vocab", beyond)
                out.append(TrainSequence(torch.tensor(prompts[p].ids + ids, dtype=torch.long), len(prompts[p].ids),
                                         topk_ids, topk_lps, valid_rows(len(ids), keep)))
        return out

