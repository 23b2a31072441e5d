"""Which teacher a prompt goes to: the rule of ``teacher_route``, written once for the trainer, its start-up checks
and ``brts prewarm --route``.

The rule (NeMo-RL's and miles' multi-teacher OPD): a prompt whose route value (the ``teacher_route`` column, on
``Problem.route``) names a teacher goes to that teacher; any other prompt, one without a value included, goes to
``default``. A value that names no teacher while there is no ``default`` has nowhere to go: the run refuses to
start, with one line listing the values and the teachers, rather than dropping or misrouting prompts. Pure
functions, no I/O.
"""

from __future__ import annotations

from collections import Counter
from typing import Collection, Sequence

from brts.shared.config import DEFAULT_TEACHER
from brts.shared.data import Problem

__all__ = ["RoutingError", "check_routes", "problems_of", "teacher_of"]


class RoutingError(ValueError):
    """Some prompts' routes name no teacher and there is no ``default``; the message lists both."""


def teacher_of(route: str | None, teachers: Collection[str]) -> str | None:
    """The teacher a prompt with this route value goes to; None when it has nowhere to go."""
    if route is not None and route in teachers:
        return route
    return DEFAULT_TEACHER if DEFAULT_TEACHER in teachers else None


def check_routes(problems: Sequence[Problem], teachers: Collection[str], column: str | None) -> Counter[str]:
    """How many problems go to each teacher; ``RoutingError`` when some have no teacher (one line, the values)."""
    counts: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    for p in problems:
        name = teacher_of(p.route, teachers)
        if name is None:
            lost["(none)" if p.route is None else p.route] += 1
        else:
            counts[name] += 1
    if lost:
        values = ", ".join(f"{v!r} ({n})" for v, n in sorted(lost.items()))
        where = f"teacher_route column {column!r}" if column else "no teacher_route"
        raise RoutingError(f"{where}: {sum(lost.values())} prompts route to no teacher and there is no "
                           f"{DEFAULT_TEACHER!r} teacher: values {values}; teachers: {', '.join(sorted(teachers))} "
                           f"(add a teacher of that name or one named {DEFAULT_TEACHER!r})")
    return counts


def problems_of(problems: Sequence[Problem], teachers: Collection[str], name: str) -> list[Problem]:
    """The problems routed to teacher ``name`` (in dataset order): what ``brts prewarm --route NAME`` fills."""
    return [p for p in problems if teacher_of(p.route, teachers) == name]
