"""A training rank: ``python -m brts.trainer.main --config RUN_DIR/config.yaml [--resume CKPT]`` under torchrun.

``brts train`` writes the resolved config and launches the ranks (``trainer/launch.py``); on several nodes run
this module with torchrun yourself, with the same config file on every node. Here: the process group, the exit
protocol below and the ``Trainer`` (``trainer.py``: setup, the loop, teardown; one step is ``loop.py``'s).

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

STATUS_ENV, TEACHER_ENV = "BRTS_STATUS_FILE", "BRTS_TEACHER_FINGERPRINT"


def _status(code: int, message: str) -> None:
    path = os.environ.get(STATUS_ENV)
    if path:
        Path(path).write_text(json.dumps({"code": code, "message": message}) + "\n", encoding="utf-8")


def expected_teachers() -> dict[str, str] | None:
    """The fingerprint of each teacher as the launcher's preflight saw it (a JSON map in ``TEACHER_ENV``)."""
    raw = os.environ.get(TEACHER_ENV)
    return {str(k): str(v) for k, v in json.loads(raw).items()} if raw else None


def train(config_path: str, resume: str | None) -> int:
    """Set up, run the steps, tear down; returns the exit code (rank 0 prints the outcome)."""
    from transformers.utils import logging as hf_logging

    from brts.trainer.config import load_train_config
    from brts.trainer.fsdp import init_distributed
    from brts.trainer.loop import TrainError
    from brts.trainer.trainer import Trainer

    hf_logging.disable_progress_bar()  # N ranks × "Loading weights" bars say nothing
    config, launch = load_train_config(config_path)
    info = init_distributed(launch.device if launch.device != "auto" else "auto")
    trainer = None
    try:
        trainer = Trainer(config, info, resume, expected_teachers())
        message = trainer.run()
        if info.is_main:
            print(f"brts train: {message}", flush=True)
            _status(0, message)
        return 0
    except TrainError as exc:
        if info.is_main and os.environ.get(STATUS_ENV):
            _status(exc.exit_code, str(exc))  # the launcher prints it as its last line
        elif info.is_main:
            print(f"brts train: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    finally:
        if trainer is not None:
            trainer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brts.trainer.main", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="resolved training config (YAML), e.g. RUN_DIR/config.yaml")
    parser.add_argument("--resume", default=None,
                        help="run dir, checkpoint dir or RUN_DIR/checkpoints/latest to continue from")
    args = parser.parse_args(argv)
    code = train(args.config, args.resume)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if os.environ.get(STATUS_ENV) else code


if __name__ == "__main__":
    sys.exit(main())
