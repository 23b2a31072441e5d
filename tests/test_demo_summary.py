"""The demo's table from hand-made metrics lines: accuracies per set and seed, spread, tiers, overlap gap, hit rate,
and its errors."""

import math

import pytest

from brts.demo_summary import accuracy, final_eval, format_summary, overlap_gap, summarize, tier_composition

METRIC = "eval/problems/mean@4"
HELD = "eval/held_out/mean@4"


def _run(final: float, tiers=(1.0, 0.0, 0.0, 0.0), prompts=8, hit=1.0, tier2=(0, 0, 0), steps=2, held=0.0,
         overlap=(None, None)):
    lines = []
    for step in range(1, steps + 1):
        r = {"step": step, "prompts": prompts, "cache_hit_rate": hit, "tier/1": tiers[0], "tier/2": tiers[1],
             "tier/3": tiers[2], "tier/skip": tiers[3], "tier2/drawn": tier2[0], "tier2/rescued": tier2[1],
             "tier2/leaked": tier2[2], "overlap/chosen": overlap[0], "overlap/others": overlap[1]}
        if step == steps:
            r[METRIC], r[HELD] = final, held
        lines.append(r)
    return lines


def _opd(final: float, held: float = 0.0):
    return [{"step": 1, "prompts": 8, "tier/1": None}, {"step": 2, "prompts": 8, METRIC: final, HELD: held}]


def test_mean_and_sample_spread_over_seeds():
    a = accuracy("x", [0.2, 0.3, 0.4])
    assert a.mean == pytest.approx(0.3)
    assert a.spread == pytest.approx(0.1)  # sample standard deviation (n - 1)
    assert accuracy("one", [0.5]).spread == 0.0
    assert math.isnan(accuracy("none", []).mean)


def test_final_eval_takes_the_last_evaluated_line_and_refuses_an_unfinished_run():
    lines = [{"step": 1, METRIC: 0.1}, {"step": 2}, {"step": 3, METRIC: 0.4}, {"step": 4}]
    assert final_eval(lines, METRIC) == 0.4
    with pytest.raises(ValueError, match="final evaluation"):
        final_eval([{"step": 1}], METRIC)


def test_tier_composition_is_weighted_by_prompts_and_ignores_runs_without_a_teacher_branch():
    big = _run(0.5, tiers=(1.0, 0.0, 0.0, 0.0), prompts=6, tier2=(0, 0, 0))
    small = _run(0.5, tiers=(0.5, 0.5, 0.0, 0.0), prompts=2, tier2=(1, 1, 0))
    tiers, tier2 = tier_composition([big, small, _opd(0.1)])
    assert tiers["1"] == pytest.approx((6 * 1.0 * 2 + 2 * 0.5 * 2) / 16)
    assert tiers["2"] == pytest.approx(2 * 0.5 * 2 / 16)
    assert tiers["3"] == 0.0 and tiers["skip"] == 0.0
    assert tier2 == {"drawn": 2, "rescued": 2, "leaked": 0}
    empty, _ = tier_composition([_opd(0.1)])
    assert math.isnan(empty["1"])


def test_summary_rows_and_table_text():
    s = summarize({"problems": [0.25, 0.26, 0.24], "held_out": [0.2, 0.2, 0.2]},
                  [_run(0.34, hit=1.0, held=0.1), _run(0.36, hit=0.5, held=0.2), _run(0.35, hit=1.0, held=0.3)],
                  [_opd(0.24, 0.25), _opd(0.26, 0.25), _opd(0.25, 0.25)], 4,
                  prewarm={"prompts": 64, "cache_hits": 64, "tokens_generated": 0, "seconds": 1.5},
                  timings={"total": 300.0})
    before, opd, brts = s.sets["problems"]
    assert (
        before.per_seed == (0.25, 0.26, 0.24) and opd.mean == pytest.approx(0.25) and brts.mean == pytest.approx(0.35)
    )
    assert [r.mean for r in s.sets["held_out"]] == pytest.approx([0.2, 0.25, 0.2])
    assert s.train_hit_rate == pytest.approx(5 / 6)
    text = format_summary(s)
    assert "0.350 ± 0.010" in text and "0.250 ± 0.010" in text and "0.200 ± 0.100" in text
    head = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    assert head == ["", "training problems: mean@4 (mean ± sd)", "per seed", "held-out problems: mean@4 (mean ± sd)",
                    "per seed"]
    assert "training problems: BRTS - OPD: +0.100" in text and "BRTS >= OPD" in text
    assert "held-out problems: BRTS - OPD: -0.050; BRTS - before: +0.000; OPD - before: +0.050" in text
    assert "64/64 prompts already cached" in text and "hit rate 83%" in text
    assert "Tier 1 100%" in text and "total 300 s" in text
    assert "overlap" not in text  # no step had both overlaps
    d = s.as_dict()
    assert d["accuracy"]["problems"]["after BRTS"]["per_seed"] == [0.34, 0.36, 0.35]
    assert d["accuracy"]["held_out"]["after BRTS"]["per_seed"] == [0.1, 0.2, 0.3] and d["metric"] == "mean@4"
    assert d["prewarm"]["cache_hits"] == 64


def test_a_losing_brts_is_reported_as_such():
    s = summarize({"problems": [0.3]}, [_run(0.2)], [_opd(0.4)], 4)
    assert "BRTS < OPD" in format_summary(s) and "BRTS - OPD: -0.200" in format_summary(s)
    assert list(s.sets) == ["problems"] and "held-out" not in format_summary(s)


def test_the_overlap_gap_averages_steps_that_have_both_overlaps():
    runs = [_run(0.3, overlap=(0.9, 0.6)), _run(0.3, overlap=(0.7, 0.6), steps=1), _run(0.3)]
    gap = overlap_gap(runs)
    assert gap["chosen"] == pytest.approx((0.9 * 2 + 0.7) / 3) and gap["others"] == pytest.approx(0.6)
    assert gap["gap"] == pytest.approx(gap["chosen"] - 0.6) and gap["steps"] == 3
    assert overlap_gap([_run(0.3)]) == {}
    tiny = summarize({"problems": [0.3]}, [_run(0.3, overlap=(0.99999, 1.0))], [_opd(0.3)], 4)
    assert "(gap +0.000, over 2 steps)" in format_summary(tiny)  # never "-0.000"
    s = summarize({"problems": [0.3, 0.3, 0.3]}, runs, [_opd(0.3)] * 3, 4)
    assert "chosen candidate 0.833, the others 0.600 (gap +0.233, over 3 steps)" in format_summary(s)


def _pooled(final: float, shares: dict[str, tuple[float, float, float]], tiers=(0.75, 0.25, 0.0, 0.0), prompts=8,
            overlaps: dict[str, float] | None = None, steps=2):
    """A pooled BRTS run: per teacher its share of each tier's choices (the trainer's chosen/NAME/tier/T)."""
    lines = _run(final, tiers=tiers, prompts=prompts, steps=steps)
    for r in lines:
        for name, by_tier in shares.items():
            r.update({f"chosen/{name}/tier/{t}": by_tier[t - 1] for t in (1, 2, 3)})
            r[f"overlap/chosen/{name}"] = (overlaps or {}).get(name)
    return lines


def test_teacher_shares_rebuild_counts_from_per_step_ratios_weighted_by_prompts():
    from brts.demo_summary import teacher_shares

    # run a: 8 prompts/step, Tier 1 6 of them (default wrote 4, second 2), Tier 2 2 (all default's): 2 steps
    a = _pooled(0.3, {"default": (4 / 6, 1.0, None), "second": (2 / 6, 0.0, None)}, overlaps={"default": 0.9,
                                                                                            "second": 0.5})
    # run b: 4 prompts/step, all Tier 1, second wrote every one; default never chosen (its overlap line is None)
    b = _pooled(0.3, {"default": (0.0, None, None), "second": (1.0, None, None)}, tiers=(1.0, 0.0, 0.0, 0.0),
                prompts=4, overlaps={"second": 0.7})
    s = teacher_shares([a, b])
    assert s["default"]["chosen"] == pytest.approx(2 * (4 + 2)) and s["second"]["chosen"] == pytest.approx(2 * 2 + 8)
    assert s["default"]["all"] == pytest.approx(12 / 24) and s["second"]["all"] == pytest.approx(12 / 24)
    assert s["default"]["tier1"] == pytest.approx(8 / 20) and s["second"]["tier1"] == pytest.approx(12 / 20)
    assert s["default"]["tier2"] == 1.0 and s["second"]["tier2"] == 0.0
    assert math.isnan(s["default"]["tier3"])  # no prompt reached Tier 3
    assert s["default"]["overlap"] == pytest.approx(0.9)
    assert s["second"]["overlap"] == pytest.approx((0.5 * 2 + 0.7 * 2) / 4)
    assert teacher_shares([_run(0.3)]) == {}  # a one-teacher run has no chosen/NAME lines


def test_a_pooled_demo_adds_its_row_deltas_and_the_teachers_table():
    pool = [_pooled(0.5, {"default": (0.5, 1.0, None), "second": (0.5, 0.0, None)}, overlaps={"default": 0.8,
                                                                                             "second": 0.6})]
    s = summarize({"problems": [0.3]}, [_run(0.4)], [_opd(0.35)], 4, pool_runs=pool,
                  second_prewarm={"prompts": 8, "cache_hits": 0, "tokens_generated": 90, "seconds": 2.0})
    assert [r.label for r in s.sets["problems"]][-1] == "after BRTS, 2-teacher pool"
    text = format_summary(s)
    assert "BRTS - OPD: +0.050" in text and "pool - BRTS: +0.100; pool - OPD: +0.150" in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| default") or line.startswith("| second")}
    assert rows["default"] == ["62% (10 prompts)", "50%", "100%", "n/a", "0.800"]
    assert rows["second"] == ["38% (6 prompts)", "50%", "0%", "n/a", "0.600"]
    assert "Second teacher's cache: prewarm found 0/8 prompts already cached, generated 90 tokens" in text
    assert s.as_dict()["pool"]["shares"]["second"]["tier1"] == 0.5
    assert "pool" not in summarize({"problems": [0.3]}, [_run(0.4)], [_opd(0.35)], 4).as_dict()
