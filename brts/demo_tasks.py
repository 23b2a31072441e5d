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

#: The demo before issue #25: 64 training problems, each seen 2.5 times in 20 x 8, at lr 1e-3. The variants of the
#: first round of the search change one thing each from it.
_MEMORISE = {"problems": 64, "lr": 1e-3}
_ONCE = {"problems": 160}  # 20 steps x 8 prompts: each training problem is asked once
_GENTLE = {**_ONCE, "lr": 3e-4}

TASKS: dict[str, tuple[str, DemoSettings]] = {
    "default": ("the shipped demo: 160 training problems seen once each at lr 3e-4, a weak student (30 % exact match); "
                "the search's 'gentle' variant, the one where held-out accuracy moved", DemoSettings(**_GENTLE)),
    "memorise": ("the demo before issue #25: 64 training problems seen 2.5 times each at lr 1e-3",
                 DemoSettings(**_MEMORISE)),
    "ancestor": ("memorise, with the student the teacher's own fit stopped at 50 % (closer to the teacher, same "
                 "architecture)", DemoSettings(**_MEMORISE, student_fit={**_ANCESTOR, "target_accuracy": 0.5})),
    "styles": ("memorise, with a teacher answering in 3 styles (working / sentence / box only), the student in the "
               "working style", DemoSettings(**_MEMORISE, teacher_fit={"styles": ["work", "answer", "boxed"]})),
    "styles-gentle": ("the default (gentle) with the 3-style teacher: does BRTS's fall in 'styles' survive a gentler "
                      "step?", DemoSettings(**_GENTLE, teacher_fit={"styles": ["work", "answer", "boxed"]})),
    "one-digit": ("memorise on operands 0..9: a smaller answer space, an operation a tiny model learns more easily",
                  DemoSettings(**_MEMORISE, max_operand=9)),
    "each-once": ("memorise with 160 training problems, each seen once (less to memorise per problem)",
                  DemoSettings(**{**_MEMORISE, **_ONCE})),
    "one-digit-gentle": ("one-digit at lr 3e-4: is one-digit's collapse (rollouts run to the length limit) the step "
                         "size?", DemoSettings(problems=64, lr=3e-4, max_operand=9)),
    "ancestor-each-once": ("each-once with the ancestor student",
                           DemoSettings(**_ONCE, lr=1e-3, student_fit={**_ANCESTOR, "target_accuracy": 0.5})),
    "ancestor-gentle": ("the default (gentle) with the ancestor student",
                        DemoSettings(**_GENTLE, student_fit={**_ANCESTOR, "target_accuracy": 0.5})),
}


def task_settings(name: str, tails: bool = False) -> DemoSettings:
    """The named task's settings (``tails`` switches both losses' tail buckets on); ValueError naming the tasks."""
    if name not in TASKS:
        raise ValueError(f"--task: must be one of {', '.join(TASKS)}; got {name!r}")
    settings = TASKS[name][1]
    return settings if not tails else DemoSettings(**{**asdict(settings), "tails": True})
