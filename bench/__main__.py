"""`make bench` / `python -m bench [NAME ...]`: run the CPU benchmarks and print one table of their ratios.

Each bench script is standalone (run one alone for its full table and options: `python bench/bench_cache.py
--help`). Here each runs in its own subprocess, one after another, with ``$BRTS_BENCH_JSON`` pointing at a file
where it appends its headline ratios as rows (bench/_rows.py); its own output goes to
``bench/results/logs/NAME.log``. A script that crashes, times out or emits no row shows as a failed row; the
others still run. The table, with the machine's description, is printed and written to
``bench/results/summary.md`` and ``summary.json``.

Sizes: every script runs at its own defaults (the issues' sizes, or the CPU sizes its docstring gives) except
bench_train_step, whose steps take 4 s on a quiet 2-core box but 10-25 s when other jobs share it, so its 3
default repeats alone could take 20+ minutes; here it runs 2 repeats (4 timed steps per mode and N, the 8
configurations still interleaved per repeat), so that `make bench` fits in about 30 minutes on a loaded box.
``--full`` runs every script at its own defaults. The GPU checks (gpu_check.py, gpu_update_check.py) need CUDA
and are only run when named.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # _rows and _table, the same modules the scripts import

from _rows import ENV, read_rows  # noqa: E402 - after the sys.path line that makes the bench scripts importable
from _table import BenchRun, failed_row, machine_description, render_markdown, summary_json, write_summary  # noqa: E402 - after the sys.path line that makes the bench scripts importable

CPU = ["bench_loss_memory", "bench_scoring_memory", "bench_generation", "bench_prewarm", "bench_cache", "bench_server",
       "bench_update", "bench_train_step"]
# what the aggregate run passes instead of a script's defaults (see the module docstring); --full drops these
AGGREGATE_ARGS: dict[str, list[str]] = {"bench_train_step": ["--repeats", "2"]}


def _last_line(path: Path) -> str:
    """The last non-empty line of a log: usually the error a failed script ended with."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _pump(stream: IO[bytes], log: IO[bytes], echo: bool) -> None:
    for chunk in iter(stream.readline, b""):
        log.write(chunk)
        log.flush()
        if echo:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()


def run_script(name: str, script: Path, args: list[str], log_path: Path, timeout_s: float,
               verbose: bool = False) -> BenchRun:
    """Run one bench script in its own process group (its workers and torchrun ranks too), output to
    ``log_path`` (and the console with ``verbose``), and collect the rows it emitted."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd, rows_path = tempfile.mkstemp(prefix=f"{name}-", suffix=".jsonl")
    os.close(fd)
    env = dict(os.environ, **{ENV: rows_path}, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    returncode: int | None
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
            assert proc.stdout is not None
            pump = threading.Thread(target=_pump, args=(proc.stdout, log, verbose), daemon=True)
            pump.start()
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this call started, nothing else
                proc.wait()
                returncode = None
            except KeyboardInterrupt:  # the script is in its own session: Ctrl-C does not reach it
                os.killpg(proc.pid, signal.SIGKILL)
                raise
            pump.join(timeout=10)
        seconds = time.perf_counter() - t0
        try:
            rows = read_rows(rows_path)
            bad_rows = ""
        except ValueError as exc:
            rows, bad_rows = [], f"unreadable rows: {exc}"
    finally:
        os.unlink(rows_path)
    try:
        shown = str(log_path.relative_to(HERE.parent))
    except ValueError:
        shown = str(log_path)
    run = BenchRun(name, seconds, returncode, rows, args, shown)
    if returncode is None:
        run.rows.append(failed_row(name, f"timed out after {timeout_s:.0f} s; see {shown}"))
    elif returncode != 0:
        run.rows.append(failed_row(name, f"exit {returncode}: {_last_line(log_path)}"))
    elif bad_rows or not rows:
        run.rows.append(failed_row(name, bad_rows or f"exited 0 but emitted no row; see {shown}"))
    return run


def run_all(names: list[str], scripts: Path, out_dir: Path, full: bool = False, timeout_s: float = 1800,
            verbose: bool = False) -> tuple[list[BenchRun], float]:
    """Run ``names`` one after another with a progress line each; the runs and the total seconds."""
    runs = []
    t0 = time.perf_counter()
    for i, name in enumerate(names, 1):
        args = [] if full else AGGREGATE_ARGS.get(name, [])
        print(f"[{i}/{len(names)}] {name} {' '.join(args)}".rstrip() + " ...", flush=True)
        run = run_script(name, scripts / f"{name}.py", args, out_dir / "logs" / f"{name}.log", timeout_s, verbose)
        status = "ok" if run.ok else "FAILED"
        print(f"      {status}: {sum(r.status == 'ok' for r in run.rows)} rows in {run.seconds:.0f} s "
              f"(log {run.log})", flush=True)
        runs.append(run)
    return runs, time.perf_counter() - t0


def main(argv: list[str] | None = None, scripts: Path = HERE) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("names", nargs="*", help=f"scripts to run (default: {' '.join(CPU)})")
    ap.add_argument("--full", action="store_true",
                    help="every script at its own default sizes (bench_train_step: 3 repeats)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per script before it is killed (default 1800)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="where summary.md/.json and logs/ go")
    ap.add_argument("-v", "--verbose", action="store_true", help="also stream each script's output to the console")
    args = ap.parse_args(argv)
    names = args.names or CPU
    unknown = [n for n in names if not (scripts / f"{n}.py").is_file()]
    if unknown:
        known = sorted(p.stem for p in scripts.glob("*.py") if not p.stem.startswith("_"))
        print(f"bench: unknown {', '.join(unknown)}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    machine = machine_description()
    runs, total = run_all(names, scripts, args.out, args.full, args.timeout, args.verbose)
    sizes = "; ".join(f"{n} {' '.join(a)}" for n, a in AGGREGATE_ARGS.items() if n in names)
    note = "" if args.full or not sizes else (f"Aggregate sizes: {sizes} (`python -m bench --full` for each "
                                              "script's own defaults).")
    markdown = render_markdown(machine, runs, total, note)
    md, js = write_summary(args.out, markdown, summary_json(machine, runs, total))
    print("\n" + markdown)
    print(f"written: {md} and {js}")
    return 0 if all(run.ok for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
