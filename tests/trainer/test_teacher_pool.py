"""A cross-teacher pool without a server: the union of the windows, when Tier 2 is drawn, the seeded tie order and
the metrics of whose candidate was chosen (the real two-server run is in test_multi_teacher.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from brts.shared.client import Candidate, PromptCandidates
from brts.shared.config import ConfigError
from brts.trainer.config import load_train_config
from brts.trainer.metrics import StepCounters, reduce_counters, step_metrics
from brts.trainer.selection import select_candidate, tie_order
from brts.trainer.teacher_pool import needs_rescue, union_of


def _cand(tier: int, index: int, correct: bool) -> Candidate:
    return Candidate(tier, index, np.array([1, 2], dtype=np.int32), "x", correct, False, "stop",
                     np.zeros((2, 1), np.int32), np.zeros((2, 1), np.float32), True)


def _window(*correct: bool, tier2: tuple[bool, ...] = (), hit: bool = True) -> PromptCandidates:
    cands = [_cand(1, i, ok) for i, ok in enumerate(correct)] + [_cand(2, i, ok) for i, ok in enumerate(tier2)]
    return PromptCandidates("p", cands, int(bool(tier2)), 0, hit, 0.5, missing=0, wire_bytes=10)


def test_the_union_keeps_each_teachers_window_and_takes_tier2_from_the_routed_teacher():
    windows = {"a": _window(False, True), "b": _window(False, False, hit=False)}
    assert not needs_rescue(windows)
    assert needs_rescue({"b": windows["b"]}) and not needs_rescue({"a": _window()})  # an empty union: nothing
    pool = union_of("p@0", windows, ["b", "a"], None, "a")
    assert [(c.teacher, c.tier, c.index, c.correct) for c in pool.candidates] == [
        ("b", 1, 0, False), ("b", 1, 1, False), ("a", 1, 0, False), ("a", 1, 1, True)]
    assert pool.tier2_drawn == 0 and not pool.cache_hit and pool.wire_bytes == 20
    rescue = _window(False, False, tier2=(True,))
    rescued = union_of("p@0", {"b": windows["b"]}, ["b"], rescue, "a")
    assert [(c.teacher, c.tier) for c in rescued.candidates] == [("b", 1), ("b", 1), ("a", 2)]
    assert rescued.tier2_drawn == 1 and windows["a"].candidates[0].teacher == ""  # the inputs are not changed


def test_ties_in_a_cross_teacher_pool_are_a_seeded_draw_not_the_listing_order():
    group = [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert tie_order(group, None) == group
    assert tie_order(group, 7) == tie_order(group, 7) and sorted(tie_order(group, 7)) == group
    overlaps = {key: 0.5 for key in group}  # four candidates tied (two per teacher in a 2+2 union)
    plain = select_candidate([True] * 4, [], overlaps, "most_similar")
    assert plain == (1, (1, 0))  # single-teacher runs: the lowest index, as before
    wins = Counter(select_candidate([True] * 4, [], overlaps, "most_similar", seed)[1] for seed in range(400))
    assert set(wins) == set(group) and min(wins.values()) > 70, wins  # each ~100 of 400: no member favoured
    # a strictly higher overlap still wins whatever the draw
    assert {select_candidate([True] * 4, [], {**overlaps, (1, 3): 0.6}, "most_similar", s) for s in range(50)} == \
        {(1, (1, 3))}


def test_candidate_teachers_is_validated():
    base = ["student=s", "teachers.default.address=h:1", "teachers.weak.address=h:2"]
    assert load_train_config(None, [*base, "candidate_teachers=[weak, default]"])[0].candidate_teachers == \
        ("weak", "default")
    for value, message in [("[default, strong]", "unknown teacher 'strong'; teachers: default, weak"),
                           ("[default]", "must list two or more different teachers"),
                           ("[weak, weak]", "must list two or more different teachers")]:
        with pytest.raises(ConfigError, match=rf"^train\.candidate_teachers: {message}"):
            load_train_config(None, [*base, f"candidate_teachers={value}"])


def test_metrics_say_whose_candidate_was_chosen_per_tier():
    import torch

    c = StepCounters()
    for key, value in [("chosen/a/tier1", 3), ("chosen/b/tier1", 1), ("chosen/b/tier2", 2), ("chosen/a/overlap_sum",
                       1.5), ("chosen/a/overlap_n", 3), ("chosen/b/overlap_n", 0)]:
        c.add(key, value)
    g = reduce_counters(c, torch.device("cpu"), ["a", "b"], pooled=True)

    class Stats:
        loss = student_context = teacher_context = grad_norm = 0.0
        skipped, sc_tokens, tc_tokens = False, 1, 1

    rec = step_metrics(1, g, Stats(), 1e-4)
    assert rec["chosen/a/share"] == 0.5 and rec["chosen/b/share"] == 0.5
    assert rec["chosen/a/tier/1"] == 0.75 and rec["chosen/b/tier/2"] == 1.0 and rec["chosen/a/tier/3"] is None
    assert rec["overlap/chosen/a"] == 0.5 and rec["overlap/chosen/b"] is None
    unpooled = step_metrics(1, reduce_counters(c, torch.device("cpu"), ["a", "b"]), Stats(), 1e-4)
    assert not [k for k in unpooled if k.startswith("chosen/")]
