"""Several teachers, the parts without a server: the ``teachers:`` section's validation, the routing rule, the route
column of the loaders, the resume rules (addresses may move, the set of teachers may not), the per-teacher metrics
and a routed call's answers put back in order, a failure naming its teacher."""

from __future__ import annotations

import json
from concurrent.futures import Future

import pytest

from brts.shared.client import TeacherUnavailableError
from brts.shared.config import DEFAULT_TEACHER, ConfigError
from brts.shared.data import DataFormatError, Problem, load_dataset
from brts.trainer.checkpoint import RESUME_MUTABLE_KEYS, config_diff, saved_teachers, teacher_set_change
from brts.trainer.config import load_train_config
from brts.trainer.loop import teacher_down_error
from brts.trainer.metrics import StepCounters, reduce_counters, step_metrics, teacher_keys
from brts.trainer.routing import RoutingError, check_routes, problems_of, teacher_of
from brts.trainer.teacher_link import Routed, TeacherDown

TWO = ["student=s", "teachers.default.address=h:1", "teachers.weak.address=h:2", "teacher_route=data_source"]


def _config(*overrides: str):
    return load_train_config(None, list(overrides))[0]


def test_teachers_section_is_validated_by_full_field_name():
    config = _config(*TWO, "teachers.weak.sampling.max_new_tokens=20", "teachers.weak.retries=2")
    assert list(config.teacher_entries()) == ["default", "weak"]
    assert config.teacher_sampling("weak").max_new_tokens == 20 and config.teacher_sampling("default").max_new_tokens \
        == config.sampling.max_new_tokens
    assert config.teacher_sampling("weak").temperature == config.sampling.temperature  # the rest: the run's
    for override, message in [
        ("teachers.weak.adress=h:3", r"^train\.teachers\.weak\.adress: unknown setting; known settings: address"),
        ("teachers.weak.address=h", r"^train\.teachers\.weak\.address: must be HOST:PORT, got 'h'"),
        ("teachers.weak.retries=-1", r"^train\.teachers\.weak\.retries: must be >= 0"),
        ("teachers.weak.retries=many", r"^train\.teachers\.weak\.retries: must be an integer"),
        ("teachers.weak.sampling.top_p=3", r"^train\.teachers\.weak\.sampling\.top_p: must be in \(0, 1\]"),
        ("teachers.weak.sampling.temp=1", r"^train\.teachers\.weak\.sampling\.temp: unknown setting"),
        ("teachers.w.x.address=h:3", r"^train\.teachers\.w\.x: unknown setting"),
        ("teachers.third.retries=1", r"^train\.teachers\.third\.address: must be HOST:PORT, got ''"),
        ("server=h:9", r"^train\.server: set either server .* or teachers, not both"),
        ("teachers=[a, b]", r"^train\.teachers: must be a mapping of names to settings"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _config(*TWO, override)
    with pytest.raises(ConfigError, match=r"^train\.teachers\.a b: a teacher's name is letters, digits"):
        load_train_config(None, ["student=s"], teachers={"a b": {"address": "h:1"}})


def test_server_is_shorthand_for_one_teacher_named_default():
    config = _config("student=s", "server=h:7", "server_retries=3", "server_tls_ca=ca.pem")
    (name, entry), = config.teacher_entries().items()
    assert name == DEFAULT_TEACHER and (entry.address, entry.retries, entry.tls_ca) == ("h:7", 3, "ca.pem")


def _problem(i: int, route: str | None) -> Problem:
    return Problem(f"p{i}", f"{i}+1?", str(i + 1), "t", route)


def test_the_routing_rule():
    names = ["default", "weak"]
    assert teacher_of("weak", names) == "weak" and teacher_of("other", names) == "default"
    assert teacher_of(None, names) == "default" and teacher_of("weak", ["weak"]) == "weak"
    assert teacher_of("other", ["weak", "strong"]) is None
    problems = [_problem(0, "weak"), _problem(1, None), _problem(2, "x"), _problem(3, "weak")]
    assert check_routes(problems, names, "data_source") == {"weak": 2, "default": 2}
    assert [p.id for p in problems_of(problems, names, "weak")] == ["p0", "p3"]
    with pytest.raises(RoutingError) as err:
        check_routes(problems, ["weak", "strong"], "data_source")
    assert str(err.value) == ("teacher_route column 'data_source': 2 prompts route to no teacher and there is no "
                              "'default' teacher: values '(none)' (1), 'x' (1); teachers: strong, weak (add a "
                              "teacher of that name or one named 'default')")


def test_loaders_read_the_route_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"problem": "1+1?", "answer": "2", "data_source": "weak"}, {"problem": "2+2?", "answer": "4"},
            {"problem": "3+3?", "answer": "6", "data_source": 7}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.route for p in load_dataset(jsonl, "data_source")] == ["weak", None, "7"]
    assert [p.route for p in load_dataset(jsonl)] == [None, None, None]
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "data_source": str(r.get("data_source", ""))} for r in rows]), parquet)
    assert [p.route for p in load_dataset(parquet, "data_source")] == ["weak", None, "7"]
    assert {p.route for p in load_dataset("dapo", "data_source")[:50]} == {"math_dapo"}
    with pytest.raises(DataFormatError, match=r"teacher_route column 'source' not found; columns: problem, answer"):
        load_dataset(jsonl, "source")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1?", "answer": "1", "data_source": ["a"]}) + "\n")
    with pytest.raises(DataFormatError, match=r"row 0: field 'data_source': a route must be a string"):
        load_dataset(bad, "data_source")


def test_a_resume_may_move_a_teacher_but_not_change_the_set():
    saved = _config(*TWO).to_dict()
    moved = _config(*TWO[:2], "teachers.weak.address=elsewhere:9", "teachers.weak.retries=1", TWO[3]).to_dict()
    assert config_diff(saved, moved) == {}
    resampled = _config(*TWO, "teachers.weak.sampling.max_new_tokens=9").to_dict()
    assert config_diff(saved, resampled) == {"teachers.weak.sampling.max_new_tokens": (None, 9)}
    assert config_diff(saved, _config(*TWO[:3]).to_dict()) == {"teacher_route": ("data_source", None)}
    assert "teachers.*.address" in RESUME_MUTABLE_KEYS
    # a setting newer than the checkpoint (absent from its saved config) is unset there, not changed
    old = {k: v for k, v in _config("student=s").to_dict().items() if k not in ("teachers", "teacher_route")}
    assert config_diff(old, _config("student=s").to_dict()) == {}

    fps = {"default": "a" * 40, "weak": "b" * 40}
    assert saved_teachers({"teachers": fps}) == fps and saved_teachers({"teacher": "c" * 40}) == {"default": "c" * 40}
    assert saved_teachers({}) == {} and teacher_set_change(fps, dict(fps)) is None
    assert teacher_set_change({}, fps) is None  # nothing saved: nothing to hold the run to
    line = teacher_set_change(fps, {**fps, "extra": "a" * 40})
    assert line == ("the checkpoint was trained against teachers default=aaaaaaaaaaaa, weak=bbbbbbbbbbbb, now they are "
                    "default=aaaaaaaaaaaa, extra=aaaaaaaaaaaa, weak=bbbbbbbbbbbb: resume against the same teachers (a "
                    "teacher may move to another address, not change or come and go)")
    assert "weak=cccccccccccc" in teacher_set_change(fps, {**fps, "weak": "c" * 40})


def test_per_teacher_metrics_only_with_several_teachers():
    import torch

    assert teacher_keys(["default"]) == ([], [])
    c = StepCounters()
    for key, value in [("prompts", 4), ("tier1", 3), ("skip", 1), ("teacher/a/prompts", 3), ("teacher/a/tier1", 3),
                       ("teacher/a/cache_hits", 3), ("teacher/b/prompts", 1), ("teacher/b/skip", 1)]:
        c.add(key, value)
    c.time("score/a", 0.5)
    g = reduce_counters(c, torch.device("cpu"), ["a", "b"])

    class Stats:
        loss = student_context = teacher_context = grad_norm = 0.0
        skipped, sc_tokens, tc_tokens = False, 1, 1

    rec = step_metrics(1, g, Stats(), 1e-4)
    assert rec["teacher/a/prompts"] == 3 and rec["teacher/a/cache_hit_rate"] == 1.0 and rec["teacher/a/tier/1"] == 1.0
    assert rec["teacher/b/prompts"] == 1 and rec["teacher/b/cache_hit_rate"] == 0.0 and rec["teacher/b/tier/skip"] == 1
    assert rec["time/score/a"] == 0.5 and rec["time/score/b"] == 0.0
    single = step_metrics(1, reduce_counters(c, torch.device("cpu"), ["a"]), Stats(), 1e-4)
    assert [k for k in single if k.startswith(("teacher/a", "time/score/"))] == []


def _done(value=None, error: Exception | None = None) -> Future:
    f: Future = Future()
    f.set_exception(error) if error is not None else f.set_result(value)
    return f


def test_a_routed_call_puts_answers_back_in_order_and_names_a_failed_teacher():
    addresses = {"default": "h:1", "weak": "h:2"}
    routed = Routed([("default", [0, 2], _done(["a0", "a2"])), ("weak", [1], _done(["b1"]))], 3, addresses)
    assert routed.wait("Score") == ["a0", "b1", "a2"]
    failing = Routed([("default", [0], _done(["a0"])),
                      ("weak", [1], _done(error=TeacherUnavailableError("not reachable")))], 2, addresses)
    with pytest.raises(TeacherDown) as err:
        failing.wait("GetCandidates")
    assert err.value.teacher == "weak" and str(err.value) == "teacher weak at h:2: GetCandidates: UNAVAILABLE: " \
        "not reachable"
    line = str(teacher_down_error(["weak"], err.value, addresses, "runs/x"))
    assert line.startswith("teacher server weak at h:2 stopped answering (teacher weak at h:2: GetCandidates")
    assert line.endswith("restart its `brts serve` and resume with `brts train --resume runs/x`")
    assert "on another rank" in str(teacher_down_error(["default"], None, addresses, "r"))


def test_the_readme_two_teacher_config_validates(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Several teachers"):]
    block = section[section.index("```yaml\n") + len("```yaml\n"):section.index("```\n", section.index("```yaml"))]
    (tmp_path / "two.yaml").write_text(block)
    config, _ = load_train_config(tmp_path / "two.yaml")
    assert list(config.teacher_entries()) == ["default", "math_7b"] and config.teacher_route == "data_source"
    assert config.teacher_sampling("math_7b").max_new_tokens == 8192 and config.teachers["math_7b"].retries == 12


def test_prewarm_route_errors_name_what_to_fix(tmp_path):
    from click.testing import CliRunner

    from brts.cli_serve import prewarm

    cfg = tmp_path / "train.yaml"
    cfg.write_text("student: s\nteachers:\n  default: {address: 127.0.0.1:1}\n  weak: {address: 127.0.0.1:2}\n")
    runner = CliRunner()
    for args, message in [
        (["--route", "weak"], "brts prewarm: --route: give the training config with --config TRAIN.yaml"),
        (["--config", str(cfg), "--route", "strong"],
         f"brts prewarm: --route: no teacher named 'strong' in {cfg}; teachers: default, weak"),
        (["--config", str(cfg), "--route", "weak", "--server", "h:1", "--dataset", "aime24"],
         "brts prewarm: --route: dataset, server come from the training config's teacher entry; leave them out "
         "(override the training config's settings as KEY=VALUE instead)"),
        (["--config", str(cfg), "--route", "weak", "teachers.weak.retries=-1"],
         "brts prewarm: train.teachers.weak.retries: must be >= 0, got -1"),
        (["--config", str(cfg), "--route", "weak", "dataset=aime24", "teacher_route=id", "teachers.x.address=h:3"],
         "brts prewarm: --route weak: no prompt of aime24 is routed to this teacher"),
    ]:
        result = runner.invoke(prewarm, args)
        assert result.exit_code == 1 and result.stderr.strip() == message, result.output
