"""The demo's named tasks (``brts demo --task NAME``): the toy-task variants tried for issue #25, each a
``DemoSettings``.

Why named: a variant of the task (operand range, the fits' response styles, how far the student is fitted, the
training set's size) is a variant of the demo settings, so each one a user or ``bench/demo_variants.py`` runs is
reproducible by name, with its own folder key. ``default`` is the demo as it ships; the held-out set and the metric
are the same for every task (64 problems of the same generator, disjoint by text, mean@4 at T=0.7), fixed before
any variant ran, so no variant tunes the evaluation.
"""

from __future__ import annotations

from dataclasses import asdict

from brts.demo import DemoSettings
from brts.toy import QUALITIES

__all__ = ["TASKS", "task_settings"]

#: The teacher's own fit recipe stopped early: with the same seed and data order it is the teacher's ancestor.
_ANCESTOR = {k: v for k, v in asdict(QUALITIES["teacher"]).items() if k not in ("target_accuracy", "styles")}

TASKS: dict[str, tuple[str, DemoSettings]] = {
    "default": ("sums/differences of 0..20, a weak student (30 % exact match), 64 training problems",
                DemoSettings()),
    "ancestor": ("the student is the teacher's own fit stopped at 50 % (closer to the teacher, same architecture)",
                 DemoSettings(student_fit={**_ANCESTOR, "target_accuracy": 0.5})),
    "styles": ("the teacher answers in 3 styles (working / sentence / box only), the student in the working style",
               DemoSettings(teacher_fit={"styles": ["work", "answer", "boxed"]})),
    "one-digit": ("operands 0..9: a smaller answer space, an operation a tiny model learns more easily",
                  DemoSettings(max_operand=9)),
    "each-once": ("160 training problems, each prompt seen once in 20 x 8 (less to memorise per problem)",
                  DemoSettings(problems=160)),
    "gentle": ("160 training problems seen once each, lr 3e-4 (a third of the default): smaller steps, less forgetting",
               DemoSettings(problems=160, lr=3e-4)),
    "ancestor-each-once": ("the ancestor student, 160 training problems each seen once",
                           DemoSettings(problems=160, student_fit={**_ANCESTOR, "target_accuracy": 0.5})),
}


def task_settings(name: str, tails: bool = False) -> DemoSettings:
    """The named task's settings (``tails`` switches both losses' tail buckets on); ValueError naming the tasks."""
    if name not in TASKS:
        raise ValueError(f"--task: must be one of {', '.join(TASKS)}; got {name!r}")
    settings = TASKS[name][1]
    return settings if not tails else DemoSettings(**{**asdict(settings), "tails": True})
