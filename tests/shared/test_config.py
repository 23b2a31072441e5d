"""Configs validate on construction and name the field; YAML plus key=value overrides fill them."""

import pytest

from brts.shared.config import (
    ConfigError,
    EvalConfig,
    PrewarmConfig,
    ServerConfig,
    TrainConfig,
    load_config,
    parse_overrides,
    save_config,
)


def test_defaults_follow_the_reference():
    cfg = TrainConfig(student="s")
    assert (cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.logprob_k) == (1e-6, 0.01, 1.0, 16)
    assert cfg.sampling.temperature == 0.7 and cfg.sampling.top_p == 0.95
    assert cfg.overlap_mode == "prefix" and cfg.tier3 == "most_similar" and cfg.lam == 1.0
    assert cfg.prompt.instruction_suffix == "Please reason step by step, and put your final answer within \\boxed{}."


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (TrainConfig, {"student": "s", "lr": -1.0}, "train.lr: must be > 0, got -1.0"),
        (TrainConfig, {"student": "s", "overlap_mode": "middle"},
         "train.overlap_mode: must be one of prefix, position; got 'middle'"),
        (TrainConfig, {"student": ""}, "train.student: must be a model directory"),
        (TrainConfig, {"student": "s", "n_rollouts": "2"}, "train.n_rollouts: must be an integer, got '2'"),
        (TrainConfig, {"student": "s", "betas": (0.9,)}, "train.betas: must be two numbers"),
        (ServerConfig, {"model": "m", "max_logprob_k": 65}, "server.max_logprob_k: must be in 1..64"),
        (ServerConfig, {"model": "m", "host": "0.0.0.0"}, "server.host: binding 0.0.0.0 (not loopback) requires TLS"),
        (ServerConfig, {"model": "m", "engine": "tgi"}, "server.engine: must be one of hf, vllm, sglang"),
        (PrewarmConfig, {"n_tier2": -1}, "prewarm.n_tier2: must be >= 0"),
        (EvalConfig, {"model": "m", "benchmarks": ("aime24", "math500")},
         "eval.benchmarks: unknown benchmark 'math500'"),
        (EvalConfig, {"model": "m", "top_p": 0.0}, "eval.top_p: must be in (0, 1]"),
        (EvalConfig, {"model": "m", "dataset": ["a/sums.jsonl", "b/sums.parquet"]},
         "eval.dataset: two evaluation sets would both be named 'sums'"),
        (TrainConfig, {"student": "s", "eval_dataset": "data/aime24.jsonl"},
         "train.eval_dataset: two evaluation sets would both be named 'aime24'"),
    ],
)
def test_bad_values_name_the_field(cls, kwargs, message):
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert message in str(info.value)


def test_nested_sections_validate_too():
    with pytest.raises(ConfigError, match=r"sampling.top_p: must be in \(0, 1\]"):
        load_config(PrewarmConfig, overrides=["sampling.top_p=1.5"])
    with pytest.raises(ConfigError, match="prompt.max_prompt_len: must be >= 1"):
        load_config(TrainConfig, student="s", overrides=["prompt.max_prompt_len=0"])


def test_non_loopback_bind_with_tls_and_token_is_accepted():
    cfg = ServerConfig(model="m", host="0.0.0.0", tls_cert="c.pem", tls_key="k.pem", token_file="t")
    assert cfg.host == "0.0.0.0"
    assert ServerConfig(model="m", host="::1").host == "::1"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("student: tiny\nlr: 2.0e-5\nprompt:\n  max_prompt_len: 256\nbetas: [0.8, 0.9]\n")
    cfg = load_config(TrainConfig, path, overrides=["lr=3e-5", "prompt.system_prompt=You are helpful", "tier3=skip"])
    assert cfg.student == "tiny" and cfg.lr == 3e-5 and cfg.tier3 == "skip"
    assert cfg.prompt.max_prompt_len == 256 and cfg.prompt.system_prompt == "You are helpful"
    assert cfg.betas == (0.8, 0.9)
    # a saved config loads back to the same settings
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(TrainConfig, tmp_path / "saved.yaml") == cfg


def test_unknown_keys_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train.learning_rate: unknown setting; known settings: student, "):
        load_config(TrainConfig, student="s", overrides=["learning_rate=1"])
    with pytest.raises(ConfigError, match="train.prompt.chat: unknown setting"):
        load_config(TrainConfig, student="s", overrides=["prompt.chat=x"])
    with pytest.raises(ConfigError, match="override 'lr': expected key=value"):
        parse_overrides(["lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(TrainConfig, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(TrainConfig, listy)


def test_benchmarks_accept_comma_string():
    assert EvalConfig(model="m", benchmarks="aime24, amc23").benchmarks == ("aime24", "amc23")


def test_evaluation_files_are_one_path_or_several():
    """A single path (what configs written before several files were allowed say) is a one-file tuple."""
    assert TrainConfig(student="s", eval_dataset="d/problems.jsonl").eval_dataset == ("d/problems.jsonl",)
    both = TrainConfig(student="s", eval_dataset=["d/problems.jsonl", "d/held_out.jsonl"])
    assert both.eval_dataset == ("d/problems.jsonl", "d/held_out.jsonl")
    assert EvalConfig(model="m", benchmarks=(), dataset="x.jsonl").dataset == ("x.jsonl",)
    assert TrainConfig(student="s", eval_dataset=None).eval_dataset == ()  # a config saved before: ``null``


@pytest.mark.parametrize(
    "values, message",
    [
        ({"engine": "hf", "vllm_url": "http://127.0.0.1:8000"}, r"server.engine: must be vllm with vllm_url, got 'hf'"),
        ({"engine": "vllm", "sglang_url": "http://h:1"}, r"server.engine: must be sglang with sglang_url, got 'vllm'"),
        ({"engine": "vllm", "vllm_url": "127.0.0.1:8000"}, r"server.vllm_url: must be an http:// or https:// URL"),
        ({"scorer_devices": "cpu,gpu1"}, r"server.scorer_devices\[1\]: must be cpu, cuda or cuda:N; got 'gpu1'"),
    ],
)
def test_engine_urls_and_scorer_devices_are_checked(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ServerConfig, model="m", **values)


def test_engine_url_names_the_running_server_of_the_chosen_engine():
    cfg = load_config(ServerConfig, model="m", engine="vllm", vllm_url="http://n0:8000", scorer_devices="cuda:1, cuda")
    assert cfg.engine_url == "http://n0:8000" and cfg.scorer_devices == ("cuda:1", "cuda")
    assert load_config(ServerConfig, model="m", engine="sglang", sglang_url="https://r:30000").engine_url == "https://r:30000"
    assert ServerConfig(model="m").engine_url is None and ServerConfig(model="m").scorer_devices == ()
