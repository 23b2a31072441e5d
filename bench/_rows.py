"""The one machine-readable result format of the benchmarks: headline ratios as rows.

Why: each bench script prints its own detailed table for a human, and `python -m bench` (`make bench`) gathers
every script's headline ratios into one table. Rather than parse the human tables, a script hands its headline
figures to ``emit``, which appends them as JSON lines to the file named by ``$BRTS_BENCH_JSON`` (set by the
aggregator, or by hand) and does nothing when it is unset, so every script stays usable alone.

A row says what was compared (A vs B), the ratio A/B measured side by side in one run, the goal from the issue
that asked for the benchmark (``"<= 0.25"``, ``">= 0.5"`` or None where the issue set none), and the raw figures
the ratio came from. ``met`` is derived from the goal, never typed by hand.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

ENV = "BRTS_BENCH_JSON"


def goal_met(ratio: float | None, target: str | None) -> bool | None:
    """Whether ``ratio`` meets ``target`` ("<= X" or ">= X"); None when there is no target or no ratio."""
    if target is None or ratio is None or not math.isfinite(ratio):
        return None if target is None else False
    op, _, value = target.strip().partition(" ")
    bound = float(value)
    if op == "<=":
        return ratio <= bound
    if op == ">=":
        return ratio >= bound
    raise ValueError(f"target must be '<= X' or '>= X', got {target!r}")


@dataclass
class Row:
    """One headline ratio. ``figures`` holds the raw numbers (units in the key names); ``detail`` is the short
    human form of them for the summary table ("chunked 0.31 GiB vs naive 3.9 GiB")."""

    benchmark: str
    metric: str
    compared: str
    ratio: float | None
    target: str | None = None
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"  # "ok" or "failed"
    met: bool | None = None

    def __post_init__(self) -> None:
        if self.ratio is not None:
            self.ratio = float(self.ratio)
        if self.status == "ok":
            self.met = goal_met(self.ratio, self.target)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["ratio"] is not None and not math.isfinite(d["ratio"]):
            d["ratio"] = None  # JSON has no NaN
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Row:
        known = {k: d[k] for k in ("benchmark", "metric", "compared", "ratio", "target", "detail", "figures",
                                   "status") if k in d}
        return cls(**known)


def emit(*rows: Row) -> None:
    """Append ``rows`` as JSON lines to ``$BRTS_BENCH_JSON``; a no-op when the variable is unset."""
    path = os.environ.get(ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.to_json()) + "\n")


def read_rows(path: str | os.PathLike[str]) -> list[Row]:
    """The rows a script emitted (an absent or empty file gives none; a malformed line raises ValueError)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except FileNotFoundError:
        return []
    return [Row.from_json(json.loads(line)) for line in lines]
