"""The toy-task variants tried for issue #25: does distillation move held-out accuracy, and does BRTS beat OPD there?

Not a speed benchmark: a research record. Each variant is a ``DemoSettings`` (the demo's task and budget) run as a
whole ``brts demo`` (3 seeds by default) in its own folder under ``--out``; the table puts every variant's
training-problems and held-out rows (before / after OPD / after BRTS, mean@4 over seeds) side by side with the
chosen-vs-others overlap gap and the demo's time. The held-out set and the metric are fixed by the demo (64
problems of the same generator, disjoint by text, mean@4 at T=0.7) before any variant ran, so no variant tunes the
evaluation. A fit another variant already made (same fit settings) is copied, not redone.

    .venv/bin/python bench/demo_variants.py                      # every variant, ~10 min each on 2 cores
    .venv/bin/python bench/demo_variants.py ancestor styles --seeds 3 --out /tmp/variants
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brts.demo import DemoPaths, DemoSettings, run_demo  # noqa: E402 - after the sys.path line
from brts.toy import QUALITIES  # noqa: E402

#: The teacher's own fit recipe stopped early: with the same seed and data order it is the teacher's ancestor.
_ANCESTOR = {k: v for k, v in asdict(QUALITIES["teacher"]).items() if k not in ("target_accuracy", "styles")}

VARIANTS: dict[str, tuple[str, DemoSettings]] = {
    "default": ("today's demo task: sums/differences of 0..20, weak student (30 % exact match), 64 problems",
                DemoSettings()),
    "each-once": ("160 training problems, each prompt seen once in 20 x 8 (less to memorise per problem)",
                  DemoSettings(problems=160)),
    "ancestor": ("the student is the teacher's own fit stopped at 50 % (closer to the teacher, same architecture)",
                 DemoSettings(student_fit={**_ANCESTOR, "target_accuracy": 0.5})),
    "one-digit": ("operands 0..9: a smaller answer space, an operation a tiny model learns more easily",
                  DemoSettings(max_operand=9)),
    "styles": ("the teacher answers in 3 styles (working / sentence / box only), the student in the working style",
               DemoSettings(teacher_fit={"styles": ["work", "answer", "boxed"]})),
}


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
    args = ap.parse_args(argv)
    names = args.names or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"demo_variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    lines = ["| variant | training problems: before / OPD / BRTS | held-out: before / OPD / BRTS | overlap gap | "
             "total s |", "|---|---|---|---|---|"]
    results = {}
    for name in names:
        what, settings = VARIANTS[name]
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        _reuse_fits(args.out, out, settings)
        print(f"\n=== {name}: {what}", flush=True)
        summary = run_demo(out, seeds=args.seeds, settings=settings)
        results[name] = {"what": what, "summary": summary}
        gap = summary.get("overlap", {}).get("gap")
        lines.append(f"| {name} | {_row(summary, 'problems')} | {_row(summary, 'held_out')} | "
                     f"{'n/a' if gap is None else f'{gap:+.3f}'} | {summary['timings_s'].get('total', 0):.0f} |")
        (args.out / "variants.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "variants.md").write_text("\n".join(lines) + "\n\n" + "\n".join(
            f"- {n}: {r['what']}" for n, r in results.items()) + "\n")
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
