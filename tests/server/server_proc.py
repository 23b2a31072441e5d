"""Start and stop a real `brts serve` in a subprocess on loopback (shared by the server tests)."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

BRTS = [sys.executable, "-m", "brts.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``brts serve`` with the given arguments; ``address`` once it listens; all output kept in ``lines``."""

    def __init__(self, model: Path, cache: Path, extra: Sequence[str] = (), port: int | None = None,
                 timeout: float = 600.0) -> None:  # a hang guard: a fresh interpreter on a loaded core is slow
        self.port = port or free_port()
        args = [*BRTS, "serve", "--model", str(model), "--cache", str(cache), "--port", str(self.port),
                "--device", "cpu", "--dtype", "float32", *extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._queue: "queue.Queue[str | None]" = queue.Queue()
        self._pumping = threading.Thread(target=self._pump, daemon=True)
        self._pumping.start()
        self.address = self._wait_for(r"listening on (\S+)", timeout)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            self._queue.put(line)
        self._queue.put(None)

    def _wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError("brts serve exited:\n" + "\n".join(self.lines[-30:]))
            m = re.search(pattern, line)
            if m:
                return m.group(1)
        raise TimeoutError(f"brts serve did not print {pattern!r}:\n" + "\n".join(self.lines[-30:]))

    def stop(self, timeout: float = 300.0) -> str:
        """SIGTERM, wait, and return the final 'stopped (...)' line."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        self._pumping.join(timeout=60)  # every line read (the pipe's EOF), not "probably read after a pause"
        return next((line for line in reversed(self.lines) if "stopped" in line), "")

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no cleanup at all
        self.proc.wait(timeout=30)

    @staticmethod
    def counts(stopped_line: str) -> dict[str, int]:
        m = re.search(
            r"generated (\d+) entries in (\d+) engine calls, rescored (\d+), (\d+) score batches", stopped_line
        )
        if not m:
            raise AssertionError(f"no counts in {stopped_line!r}")
        return dict(zip(("generated", "engine_calls", "rescored", "score_batches"), map(int, m.groups())))
