"""When a run saves and stops: the save cadence, the SIGTERM stop, the resume and the save on a teacher outage.

Why an object of its own: the rank loop (``trainer.py``) must save at the cadence, at the last step, after a
SIGTERM and before exiting on a teacher outage, and never twice for one step (a save is collective and costs
seconds to minutes); the step the newest save holds is state, and it lives here with the rules that use it,
not in the loop. The format, save and load themselves are in ``checkpoint.py``.

torchrun forwards a SIGTERM it gets to its workers and SIGKILLs them after ``--shutdown-timeout`` (30 s by
default): a save has to fit in that window, raise it for big models.
"""

from __future__ import annotations

import signal
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from brts.shared.config import TrainConfig
from brts.trainer.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

__all__ = ["CheckpointManager", "SigtermCheckpointer"]


class SigtermCheckpointer:
    """Turns SIGTERM (and any other ``signals``) into a flag the training loop polls after each step.

    ``install()`` sets the handler (main thread only) and returns ``self``; ``should_stop()`` is a collective
    under a process group (a MAX all-reduce of the flag, so ranks that got the signal a moment apart still stop
    after the same step): call it on every rank after every step, then save and exit cleanly. ``uninstall()``
    puts the previous handlers back. A second signal does not kill the process: the save already under way is
    left to finish (the launcher's own timeout, torchrun's ``--shutdown-timeout``, is the hard limit).
    """

    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGTERM,)) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def install(self) -> "SigtermCheckpointer":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """This process got a signal (local, no communication)."""
        return self.received is not None

    def should_stop(self, device: torch.device | str | None = None) -> bool:
        """Whether any rank got a signal. ``device``: where the flag is reduced (the backend's device: cuda for
        nccl); by default cuda when the default group is nccl, else cpu."""
        flag = self.received is not None
        if not (dist.is_available() and dist.is_initialized()):
            return flag
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def __enter__(self) -> "SigtermCheckpointer":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


class CheckpointManager:
    """Owns one run's checkpoints: refuses to overwrite a run, resumes one, saves at the cadence and on the way out.

    Collective methods (``restore``, ``save``, ``after_step``, ``stop_requested``, ``save_unsaved``) run on every
    rank at the same point. ``train_state`` (JSON-able, the same on every rank) goes into each save.
    """

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.train_state: dict[str, Any] = {}
        self.stopper = SigtermCheckpointer()
        self.wrapper: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        # The newest step whose weights need no save: the one resumed from (already on disk) or 0 (the base
        # model's weights, nothing trained yet), then each step saved.
        self.saved_at = 0

    def refuse_overwrite(self, resume: str | None) -> None:
        """A fresh start on a run_dir that holds checkpoints would mix two runs: ``ValueError``, before any setup."""
        if resume is None and list_checkpoints(self.config.run_dir):
            raise ValueError(f"run_dir {self.config.run_dir} already holds checkpoints: resume it with `brts train "
                             f"--resume {self.config.run_dir}` or choose another run_dir")

    def restore(self, resume: str | None, wrapper: nn.Module,
                optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, Any]]:
        """Checkpoint ``wrapper`` and ``optimizer`` from now on, first loading them from ``resume`` if given.

        Returns ``(step, saved train_state)``: ``(0, {})`` for a fresh run. Raises ``ValueError`` (the saved config
        differs) or ``FileNotFoundError`` (no complete checkpoint at ``resume``)."""
        self.wrapper, self.optimizer = wrapper, optimizer
        if resume is None:
            return 0, {}
        step, state = load_checkpoint(resume, wrapper, optimizer, config_dict=self.config.to_dict())
        self.saved_at = step
        return step, state

    def watch_signals(self) -> None:
        """From here a SIGTERM only sets a flag: the loop saves and stops after the step under way."""
        self.stopper.install()

    def save(self, step: int) -> None:
        """Collective: save ``step`` unless it is already on disk (or is the untrained start)."""
        if step == self.saved_at:
            return
        assert self.wrapper is not None, "restore() names the model to save"
        save_checkpoint(self.config.run_dir, step, self.wrapper, self.optimizer, self.train_state,
                        self.config.to_dict(), keep_last=self.config.keep_checkpoints or None)
        self.saved_at = step

    def after_step(self, step: int) -> None:
        """Collective, after each finished step: save every ``save_every`` steps and at the last one."""
        cfg = self.config
        if cfg.save_every and step % cfg.save_every == 0 or step == cfg.max_steps:
            self.save(step)

    def stop_requested(self, step: int) -> bool:
        """Collective, after each finished step: whether any rank got a SIGTERM; if so ``step`` is saved first."""
        if not self.stopper.should_stop(self.device):
            return False
        self.save(step)
        return True

    def save_unsaved(self, step: int) -> None:
        """Collective: the last finished step before an exit on error (a teacher outage), so nothing trained is
        lost and ``--resume`` continues there."""
        self.save(step)

    def close(self) -> None:
        """Give SIGTERM back to its previous handler."""
        self.stopper.uninstall()
