"""A fork server for ``brts`` commands: import torch and transformers once, then fork one child per command.

Why: the kill -9 test starts ``brts serve`` eleven times and ``brts prewarm`` several times. A fresh interpreter
spends about 10 s importing torch and transformers on our loaded 2-core machine, which alone would be two
minutes; a child forked from an interpreter that already imported them starts serving in about two seconds.
Each child is an OS process of its own that runs the real ``brts`` click entry point (``brts.cli.main``) with
its own argv, stdout/stderr going to a log file, and the test kills it with a real SIGKILL. The fork server
itself never loads a model, opens an LMDB environment, imports gRPC or starts a thread of its own, so a child
inherits nothing live (the one other thread, OpenBLAS's pool from the numpy import, has its own fork handlers).

Protocol (JSON lines): the test writes ``{"id": N, "args": [...], "log": PATH}`` on stdin; the fork server
answers ``{"id": N, "pid": PID}`` and, when the child ends, ``{"pid": PID, "code": EXIT_CODE}`` (-9 = SIGKILL).
When stdin closes it SIGKILLs the children still running and exits.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from server_proc import ServerProcess, free_port  # noqa: E402 - light: no torch, no grpc

HEAVY_IMPORTS = (
    "numpy", "torch", "transformers", "transformers.models.qwen2.modeling_qwen2", "brts.cli", "brts.cli_serve",
    "brts.shared.tokenizer", "brts.shared.prompts", "brts.shared.data", "brts.shared.engines.hf",
    "brts.server.runtime",
)


# -- the fork server process ----------------------------------------------------------------------------------------
def _child(command: dict[str, Any]) -> None:
    """In the forked child: own session, fds 0/1/2 redirected, run ``brts ARGS``; never returns."""
    os.setsid()
    log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    code: Any = 0
    try:
        from brts.cli import main

        main.main(args=list(command["args"]), prog_name="brts")
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - report it like an uncaught exception in a fresh interpreter
        import traceback

        traceback.print_exc()
        code = 1
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve_forever() -> None:
    import importlib

    for name in HEAVY_IMPORTS:
        importlib.import_module(name)
    out = sys.stdout

    def say(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    say({"ready": True})
    children: set[int] = set()
    buffer = b""
    while True:
        while children:  # reap whoever ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            say({"pid": pid, "code": os.waitstatus_to_exitcode(status)})
        ready, _, _ = select.select([0], [], [], 0.02)
        if not ready:
            continue
        chunk = os.read(0, 65536)
        if not chunk:  # the test went away: leave nothing running
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            command = json.loads(line)
            out.flush()
            pid = os.fork()
            if pid == 0:
                _child(command)
            children.add(pid)
            say({"id": command["id"], "pid": pid})


# -- the test side ---------------------------------------------------------------------------------------------------
class Child:
    """One forked ``brts`` command: ``pid``, its log file, ``wait``/``kill`` like a ``Popen``."""

    def __init__(self, forks: "ForkServer", pid: int, log: Path) -> None:
        self.forks, self.pid, self.log = forks, pid, log

    @property
    def returncode(self) -> int | None:
        return self.forks.exit_codes.get(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float) -> int:
        with self.forks.changed:
            if not self.forks.changed.wait_for(lambda: self.pid in self.forks.exit_codes, timeout=timeout):
                raise TimeoutError(f"brts child {self.pid} still running after {timeout} s:\n{self.output()[-3000:]}")
            return self.forks.exit_codes[self.pid]

    def signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> int:
        """SIGKILL, no cleanup at all; waits until it is gone."""
        self.signal(signal.SIGKILL)
        return self.wait(30)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_line(self, needle: str, timeout: float) -> str:
        """The first log line containing ``needle`` (polled every 20 ms); error if the child ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if needle in line:
                    return line
            if self.returncode is not None:
                raise RuntimeError(f"brts child exited ({self.returncode}) before {needle!r}:\n{self.output()[-3000:]}")
            time.sleep(0.02)
        raise TimeoutError(f"no {needle!r} within {timeout} s:\n{self.output()[-3000:]}")


class ForkServer:
    """Start the fork server (one fresh interpreter, ~10 s of imports), then ``start(args, log)`` children."""

    def __init__(self, env: dict[str, str] | None = None, timeout: float = 300.0) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env)
        self.changed = threading.Condition()
        self.exit_codes: dict[int, int] = {}
        self._started: dict[int, int] = {}
        self._ready = False
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()
        with self.changed:
            if not self.changed.wait_for(lambda: self._ready or self.proc.poll() is not None, timeout=timeout):
                raise TimeoutError("the fork server did not finish its imports")
        if not self._ready:
            raise RuntimeError(f"the fork server exited ({self.proc.returncode})")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.changed:
                if msg.get("ready"):
                    self._ready = True
                elif "code" in msg:
                    self.exit_codes[msg["pid"]] = msg["code"]
                else:
                    self._started[msg["id"]] = msg["pid"]
                self.changed.notify_all()
        with self.changed:
            self._ready = False
            self.changed.notify_all()

    def start(self, args: Sequence[str], log: Path) -> Child:
        assert self.proc.stdin is not None
        with self.changed:
            ident, self._next = self._next, self._next + 1
        command = {"id": ident, "args": [str(a) for a in args], "log": str(log)}
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()
        with self.changed:
            if not self.changed.wait_for(lambda: ident in self._started, timeout=30):
                raise TimeoutError("the fork server did not fork")
            return Child(self, self._started[ident], log)

    def close(self) -> None:
        """Close its stdin: it SIGKILLs any child still running and exits."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


class Teacher:
    """``brts serve`` on a fork-server child (fp32 on the CPU, 127.0.0.1): ``address`` once it listens."""

    def __init__(self, forks: ForkServer, model: Path, cache: Path, log: Path, extra: Sequence[str] = (),
                 port: int | None = None, timeout: float = 600.0) -> None:
        self.port = port or free_port()
        self.child = forks.start(["serve", "--model", model, "--cache", cache, "--port", self.port, "--device", "cpu",
                                  "--dtype", "float32", *extra], log)
        self.address = self.child.wait_for_line("listening on", timeout).split("listening on", 1)[1].strip()

    def kill(self) -> None:
        self.child.kill()

    def stop(self, timeout: float = 60.0) -> dict[str, int]:
        """SIGTERM (drain, close the cache), wait, and return the counts of its 'stopped (...)' line."""
        self.child.signal(signal.SIGTERM)
        code = self.child.wait(timeout)
        assert code == 0, self.child.output()[-3000:]
        stopped = next((line for line in reversed(self.child.output().splitlines()) if "stopped (" in line), "")
        return ServerProcess.counts(stopped)


if __name__ == "__main__":
    _serve_forever()
