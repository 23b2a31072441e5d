"""`python -m bench`'s aggregation, on fake bench scripts (no real benchmark runs; about a second).

Why: `make bench` runs for half an hour, so its table code must be right before the run: rows a script emits
reach the table with their goal judged, and a script that crashes, hangs or emits nothing is a failed row while
the others still run.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(REPO / "bench"))  # as `python -m bench` does, so _rows/_table are the scripts' own
    return _load("bench_aggregate", REPO / "bench" / "__main__.py")


GOOD = """
import json, os
rows = [
    {"benchmark": "fake", "metric": "memory", "compared": "new vs old", "ratio": 0.1, "target": "<= 0.25",
     "detail": "1 vs 10 GiB", "figures": {"new_gib": 1, "old_gib": 10}},
    {"benchmark": "fake", "metric": "speed | MB/s", "compared": "server vs direct", "ratio": 0.4, "target": ">= 0.5"},
    {"benchmark": "fake", "metric": "scaling", "compared": "2 vs 1", "ratio": 1.5, "target": None},
]
print("a human table")
with open(os.environ["BRTS_BENCH_JSON"], "a") as f:
    for row in rows:
        f.write(json.dumps(row) + "\\n")
"""
SCRIPTS = {
    "bench_good": GOOD,
    "bench_crash": "import sys\nprint('working')\nsys.exit('boom: out of memory')\n",
    "bench_silent": "print('nothing to say')\n",
    "bench_hang": "import time\ntime.sleep(3600)\n",
}


def test_rows_and_goals(bench: ModuleType) -> None:
    rows_mod = sys.modules["_rows"]
    assert rows_mod.goal_met(0.2, "<= 0.25") is True
    assert rows_mod.goal_met(0.3, "<= 0.25") is False
    assert rows_mod.goal_met(0.5, ">= 0.5") is True
    assert rows_mod.goal_met(1.0, None) is None
    assert rows_mod.goal_met(float("nan"), ">= 0.5") is False
    row = rows_mod.Row("b", "m", "a vs b", float("nan"), ">= 1")
    assert row.to_json()["ratio"] is None and row.met is False
    assert rows_mod.Row.from_json(json.loads(json.dumps(row.to_json()))).met is False


def test_one_table_with_failed_rows(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name, text in SCRIPTS.items():
        (scripts / f"{name}.py").write_text(textwrap.dedent(text))
    out = tmp_path / "results"
    # one limit for every script: the hang never ends, and the others (plain Python, no heavy imports) end in
    # well under a second even on a loaded core, so 5 s tells them apart on any machine
    code = bench.main(["bench_good", "bench_crash", "bench_silent", "bench_hang", "--out", str(out),
                       "--timeout", "5"], scripts=scripts)
    assert code == 1  # some scripts failed, yet every one ran and the summary was written

    data = json.loads((out / "summary.json").read_text())
    by = {(r["benchmark"], r["metric"]): r for r in data["rows"]}
    assert by[("fake", "memory")]["met"] is True and by[("fake", "memory")]["figures"] == {"new_gib": 1, "old_gib": 10}
    assert by[("fake", "speed | MB/s")]["met"] is False
    assert by[("fake", "scaling")]["met"] is None
    failed = {r["benchmark"]: r for r in data["rows"] if r["status"] == "failed"}
    assert set(failed) == {"crash", "silent", "hang"}
    assert "exit 1: boom: out of memory" in failed["crash"]["detail"]
    assert "emitted no row" in failed["silent"]["detail"]
    assert "timed out" in failed["hang"]["detail"]
    assert [s["ok"] for s in data["scripts"]] == [True, False, False, False]
    assert {"cpu", "cores", "ram", "os", "python", "torch", "transformers", "vllm", "gpu", "date",
            "git commit"} <= set(data["machine"])
    assert (out / "logs" / "bench_crash.log").read_text().startswith("working")

    md = (out / "summary.md").read_text()
    printed = capsys.readouterr().out
    assert md in printed  # the printed table is the written one
    table = [line for line in md.splitlines() if line.startswith("| fake") or line.startswith("| crash")
             or line.startswith("| silent") or line.startswith("| hang")]
    assert len(table) == 6
    assert "| fake | memory | new vs old | 0.100 | ≤ 0.25 | yes | 1 vs 10 GiB |" in md
    assert "speed \\| MB/s" in md and "| **no** |" in md and md.count("**FAILED**") == 3
    assert "Goals met: 1 of 2" in md


def test_unknown_name(bench: ModuleType, tmp_path: Path) -> None:
    assert bench.main(["bench_nope", "--out", str(tmp_path)], scripts=tmp_path) == 2
    assert not (tmp_path / "summary.md").exists()
