"""The toy-task variants tried for issue #25: does distillation move held-out accuracy, and does BRTS beat OPD there?

Not a speed benchmark: a research record. Each variant is a named demo task (``brts/demo_tasks.py``: a
``DemoSettings``, also ``brts demo --task NAME``) run as a whole ``brts demo`` (3 seeds by default) in its own
folder under ``--out``; the table puts every variant's training-problems and held-out rows (before / after OPD /
after BRTS, mean@4 over seeds) side by side with the chosen-vs-others overlap gap and the demo's time. The held-out
set and the metric are fixed by the demo (64 problems of the same generator, disjoint by text, mean@4 at T=0.7)
before any variant ran, so no variant tunes the evaluation. A fit another variant already made (same fit settings)
is copied, not redone; variants run before into the same ``--out`` stay in its table (``variants.md``).

    .venv/bin/python bench/demo_variants.py                      # every variant, ~10 min each on 2 cores
    .venv/bin/python bench/demo_variants.py ancestor styles --seeds 3 --out /tmp/variants
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brts.demo import DemoPaths, DemoSettings, run_demo  # noqa: E402 - after the sys.path line
from brts.demo_tasks import TASKS  # noqa: E402
from brts.toy import QUALITIES  # noqa: E402

VARIANTS = TASKS


def _fit_key(s: DemoSettings, quality: str) -> str:
    return replace(QUALITIES[quality], **s.fit_overrides(quality)).key()


def _reuse_fits(root: Path, out: Path, s: DemoSettings) -> None:
    """Copy a fit another variant already made with the same settings (the demo then reuses it by its marker)."""
    paths = DemoPaths(out)
    for quality, target in (("teacher", paths.teacher), ("student", paths.student)):
        if (target / "toy_fit.json").is_file():
            continue
        key = _fit_key(s, quality)
        for marker in root.glob("*/models/*/toy_fit.json"):
            if json.loads(marker.read_text()).get("key") == key:
                shutil.copytree(marker.parent, target)
                break


def _row(summary: dict[str, Any], name: str) -> str:
    acc = summary["accuracy"].get(name)
    if acc is None:
        return "n/a"
    return " / ".join(f"{row['mean']:.3f}±{row['spread']:.3f}" for row in acc.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"variants to run (default: all: {' '.join(VARIANTS)})")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("demo-variants"))
    ap.add_argument("--table", action="store_true",
                    help="run nothing: rebuild the table from the variants' finished folders (OUT/NAME/summary.json)")
    args = ap.parse_args(argv)
    names = args.names or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"demo_variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    saved = args.out / "variants.json"  # variants run before into the same --out stay in the table
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    if args.table:
        done = {name: args.out / name / "summary.json" for name in names}
        results = {name: {"what": VARIANTS[name][0], "summary": json.loads(path.read_text())}
                   for name, path in done.items() if path.is_file()}
        (args.out / "variants.md").write_text(_table(results) + "\n")
        print(_table(results))
        return 0
    for name in names:
        what, settings = VARIANTS[name]
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        _reuse_fits(args.out, out, settings)
        print(f"\n=== {name}: {what}", flush=True)
        summary = run_demo(out, seeds=args.seeds, settings=settings)
        results[name] = {"what": what, "summary": summary}
        saved.write_text(json.dumps(results, indent=1) + "\n")
        table = _table(results)
        (args.out / "variants.md").write_text(table + "\n")
    print("\n" + _table(results))
    return 0


def _table(results: dict[str, Any]) -> str:
    lines = ["| variant | training problems: before / OPD / BRTS | held-out: before / OPD / BRTS | overlap gap | "
             "total s |", "|---|---|---|---|---|"]
    for name, r in results.items():
        s = r["summary"]
        gap = s.get("overlap", {}).get("gap")
        lines.append(f"| {name} | {_row(s, 'problems')} | {_row(s, 'held_out')} | "
                     f"{'n/a' if gap is None else f'{round(gap, 3) + 0.0:+.3f}'} | "
                     f"{s['timings_s'].get('total', 0):.0f} |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}: {r['what']}" for n, r in results.items())


if __name__ == "__main__":
    sys.exit(main())
