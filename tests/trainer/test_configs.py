"""Shipped training configs validate; a bad one ends with one line naming the field; preflight says in one line
what this machine lacks before anything heavy loads (brts.trainer.config and brts.trainer.preflight, issue #7
part 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from brts.shared.config import ConfigError, TrainConfig
from brts.trainer.config import CONFIG_DIR, LaunchSpec, load_train_config, shipped_configs
from brts.trainer.preflight import Machine, PreflightError, main_check, preflight

PAPER = sorted(p for p in shipped_configs() if p.name.startswith("paper_"))

# name → (n_rollouts, teacher_branch, n_candidates, n_tier2, overlap_mode, perturbed, lam, server port)
ROWS = {
    "paper_opd_baseline": (2, False, 1, 0, "prefix", False, 1.0, 50051),
    "paper_brts_n1": (1, True, 1, 0, "prefix", False, 1.0, 50051),
    "paper_brts_n2": (1, True, 2, 0, "prefix", False, 1.0, 50051),
    "paper_brts_n4": (1, True, 4, 0, "prefix", False, 1.0, 50051),
    "paper_brts_n1_tier2": (1, True, 1, 1, "prefix", False, 1.0, 50051),  # Fig. 6d's composition row (issue #23)
    "paper_brts_n2_tier2": (1, True, 2, 1, "prefix", False, 1.0, 50051),
    "paper_brts_n4_tier2": (1, True, 4, 1, "prefix", False, 1.0, 50051),
    "paper_brts_n2_perturb": (1, True, 2, 0, "prefix", True, 1.0, 50051),
    "paper_brts_n4_position_overlap": (1, True, 4, 0, "position", False, 1.0, 50051),
    "paper_brts_n2_lambda0.05": (1, True, 2, 0, "prefix", False, 0.05, 50051),
    "paper_brts_n2_teacher7b": (1, True, 2, 0, "prefix", False, 1.0, 50052),
    "paper_opd_baseline_teacher7b": (2, False, 1, 0, "prefix", False, 1.0, 50052),
}


class FakeMachine(Machine):
    """A machine with fixed answers: ``gpus`` GPUs of ``gib`` GiB each, CUDA torch unless ``cuda`` is None."""

    def __init__(self, gpus: int = 8, gib: float = 80.0, cuda: str | None = "12.8",
                 modules: tuple[str, ...] = ("vllm", "transformers"), host_gib: float = 512.0,
                 nccl: bool = True) -> None:
        self.gpus, self.gib, self.cuda = gpus, gib, cuda
        self.modules, self.host_gib, self.nccl = modules, host_gib, nccl

    def torch_version(self) -> str:
        return "2.14.0+cu128" if self.cuda else "2.13.0+cpu"

    def torch_gpu_build(self) -> str | None:
        return self.cuda

    def gpu_count(self) -> int:
        return self.gpus if self.cuda else 0

    def gpu_memory_gib(self) -> list[float] | None:
        return [self.gib] * self.gpus

    def host_available_gib(self) -> float | None:
        return self.host_gib

    def module_available(self, name: str) -> bool:
        return name in self.modules

    def nccl_available(self) -> bool:
        return self.nccl


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A stand-in student folder that also holds tokenizer files (only existence is checked, nothing loads)."""
    d = tmp_path / "student"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    return d


def _paper_ok(path: Path, model_dir: Path, tmp_path: Path, *extra: str) -> tuple[TrainConfig, LaunchSpec]:
    return load_train_config(path, [f"student={model_dir}", f"prompt.tokenizer={model_dir}",
                                    f"run_dir={tmp_path / 'run'}", *extra])


# ------------------------------------------------------------------------------------------ shipped configs


def test_the_shipped_set_is_the_paper_rows_plus_tiny_cpu():
    assert {p.stem for p in shipped_configs()} == {*ROWS, "tiny_cpu"}
    assert all(p.parent == CONFIG_DIR for p in shipped_configs())


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.stem)
def test_every_shipped_config_validates(path: Path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# "), "every config opens with a comment header saying what it reproduces"
    config, launch = load_train_config(path)
    assert isinstance(config, TrainConfig) and isinstance(launch, LaunchSpec)
    assert config.student.strip()  # a placeholder the user (or a test) overrides
    assert config.run_dir.endswith(path.stem)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_configs_run_at_the_papers_scale(path: Path):
    config, launch = load_train_config(path)
    assert (launch.nproc, launch.device, launch.backend_for("cuda")) == (8, "cuda", "nccl")
    assert "DeepSeek-R1-Distill-Qwen-1.5B" in config.student and config.prompt.tokenizer == config.student
    assert (config.prompts_per_step, config.max_response_len, config.sampling.max_new_tokens) == (64, 7168, 7168)
    assert (config.lr, config.betas, config.weight_decay, config.grad_clip, config.logprob_k) == (
        1e-6, (0.9, 0.999), 0.01, 1.0, 16)
    assert (config.rollout_temperature, config.sampling.temperature, config.sampling.top_p) == (1.0, 0.7, 0.95)
    assert (config.prompt.max_prompt_len, config.token_budget, config.dtype, config.rollout_engine) == (
        1024, 32768, "bfloat16", "vllm")
    n, branch, m, m2, overlap, perturbed, lam, port = ROWS[path.stem]
    assert (config.n_rollouts, config.teacher_branch, config.overlap_mode, config.lam) == (n, branch, overlap, lam)
    assert config.server == f"127.0.0.1:{port}"
    if branch:
        assert (config.n_candidates, config.n_tier2) == (m, m2)
    assert (config.perturbation is not None) == perturbed
    teacher = "DeepSeek-R1-Distill-Qwen-7B" if port == 50052 else "JustRL-DeepSeek-1.5B"
    assert teacher in path.read_text(encoding="utf-8").split("\n\n", 1)[0]
    # issue #23: the paper's validation length, and our defaults where the code and the paper's intent differ
    assert (config.eval_max_new_tokens, config.master_dtype, config.perturb_position, config.tier2_keep_leaked) == (
        31744, "float32", "user", False)
    header = path.read_text(encoding="utf-8").split("\n\n", 1)[0]
    for source in ("- the paper's text:", "- the authors' code", "- guesses:", "master_dtype: bfloat16",
                   "tier2_keep_leaked: true", "perturb_position: after_template"):
        assert source in header, (path.name, source)


def test_student_temperature_other_than_one_is_refused():
    """Issue #23: the loss and the student's top-K are at T=1, so rollouts at another temperature are refused."""
    with pytest.raises(ConfigError, match="train.rollout_temperature: must be 1.0") as info:
        TrainConfig(student="s", rollout_temperature=0.7)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="train.perturb_position: must be one of user, after_template"):
        TrainConfig(student="s", perturb_position="system")
    with pytest.raises(ConfigError, match="train.master_dtype"):
        TrainConfig(student="s", master_dtype="float16")
    defaults = TrainConfig(student="s")
    assert (defaults.perturb_position, defaults.tier2_keep_leaked, defaults.master_dtype) == ("user", False, "float32")


def test_perturbation_row_uses_the_reference_text_and_second_slot():
    from brts.server.pipeline import DEFAULT_PERTURBATION

    config, _ = load_train_config("paper_brts_n2_perturb")
    assert config.perturbation == DEFAULT_PERTURBATION and config.perturb_slot == 1


def test_tiny_cpu_is_small_gloo_fp32():
    config, launch = load_train_config("tiny_cpu.yaml")
    assert (launch.device, launch.backend_for("cpu"), launch.min_gpu_memory_gib) == ("cpu", "gloo", None)
    assert config.dtype == "float32" and config.rollout_engine == "hf" and config.max_steps <= 5
    assert config.teacher_branch and config.n_tier2 >= 1


def test_shipped_names_and_overrides_reach_both_sections():
    config, launch = load_train_config("paper_brts_n4", ["lr=2e-6", "launch.nproc=1", "prompt.max_prompt_len=512"],
                                       seed=3)
    assert (config.lr, config.seed, config.prompt.max_prompt_len, launch.nproc, launch.device) == (
        2e-6, 3, 512, 1, "cuda")


# ------------------------------------------------------------------------------------------ malformed configs


@pytest.mark.parametrize(
    "text, message",
    [
        ("student: s\nlr: -1\n", "train.lr: must be > 0, got -1.0"),
        ("student: s\nlearning_rate: 1e-6\n", "train.learning_rate: unknown setting"),
        ("student: s\nmax_steps: many\n", "train.max_steps: must be an integer, got 'many'"),
        ("student: s\nprompt:\n  max_prompt_len: 0\n", "prompt.max_prompt_len: must be >= 1"),
        ("student: s\nlaunch:\n  nproc: 0\n", "launch.nproc: must be >= 1, got 0"),
        ("student: s\nlaunch:\n  gpus: 8\n", "launch.gpus: unknown setting"),
        ("student: s\nlaunch:\n  device: tpu\n", "launch.device: must be one of auto, cpu, cuda"),
        ("student: s\nlaunch:\n  device: cpu\n  backend: nccl\n", "launch.backend: nccl needs device cuda"),
        ("student: s\nlaunch: 8\n", "launch: must be a mapping"),
        ("student: s\nlr: [1\n", "not valid YAML"),
        ("- student\n", "must hold a mapping of settings"),
    ],
)
def test_malformed_config_names_the_field(tmp_path: Path, text: str, message: str):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_train_config(bad)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_override_names_the_field():
    with pytest.raises(ConfigError, match=r"^launch\.min_gpu_memory_gib: must be > 0 when set"):
        load_train_config("paper_brts_n2", ["launch.min_gpu_memory_gib=0"])
    with pytest.raises(ConfigError, match=r"^train\.n_candidates: must be >= 1"):
        load_train_config("paper_brts_n2", ["n_candidates=0"])


def test_missing_file_lists_the_shipped_configs(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"does not exist \(shipped configs: .*paper_brts_n4.*tiny_cpu"):
        load_train_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------ preflight


def test_paper_config_on_this_cpu_machine_says_it_needs_gpus(model_dir: Path, tmp_path: Path):
    machine = Machine()
    if machine.gpu_count() >= 8:
        pytest.skip("this machine has 8 GPUs")
    config, launch = _paper_ok(CONFIG_DIR / "paper_brts_n4.yaml", model_dir, tmp_path)
    with pytest.raises(PreflightError) as info:
        preflight(config, launch, machine)
    message = str(info.value)
    assert "needs 8 CUDA GPUs" in message and "launch.nproc=8" in message and "\n" not in message


def test_no_gpus_with_a_cuda_torch(model_dir: Path, tmp_path: Path):
    config, launch = _paper_ok(CONFIG_DIR / "paper_brts_n2.yaml", model_dir, tmp_path)
    with pytest.raises(PreflightError, match=r"needs 8 CUDA GPUs .* but this machine shows none"):
        preflight(config, launch, FakeMachine(gpus=0))
    with pytest.raises(PreflightError, match=r"needs 8 CUDA GPUs .* shows 1\b.*\(give launch\.nproc=1"):
        preflight(config, launch, FakeMachine(gpus=1))


def test_too_little_gpu_memory(model_dir: Path, tmp_path: Path):
    config, launch = _paper_ok(CONFIG_DIR / "paper_brts_n2.yaml", model_dir, tmp_path)
    with pytest.raises(PreflightError,
                       match=r"at least 70 GiB each .* but 0 of the 8 visible have that much .smallest: 39\.5 GiB"):
        preflight(config, launch, FakeMachine(gib=39.5))


def test_missing_engine_host_memory_student_and_run_dir_in_one_line(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config, launch = load_train_config(CONFIG_DIR / "paper_brts_n4.yaml",
                                       [f"student={tmp_path / 'missing'}", f"prompt.tokenizer={tmp_path / 'missing'}",
                                        f"run_dir={blocker / 'run'}"])
    with pytest.raises(PreflightError) as info:
        preflight(config, launch, FakeMachine(modules=("transformers",), host_gib=16.0))
    problems = info.value.problems
    assert len(problems) == 4 and "\n" not in str(info.value)
    assert problems[0].startswith("needs 64 GiB of host memory") and "16.0 GiB is available" in problems[0]
    assert problems[1].startswith("rollout_engine=vllm but vllm is not importable")
    assert problems[2].startswith(f"student: {tmp_path / 'missing'} does not exist")  # the tokenizer is not repeated
    assert problems[3].startswith("run_dir:") and "is not a directory" in problems[3]


def test_tokenizer_and_dataset_checks(model_dir: Path, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    there = tmp_path / "problems.jsonl"
    there.write_text('{"problem": "What is 1+1?", "answer": "2"}\n')
    config, launch = _paper_ok(CONFIG_DIR / "paper_brts_n2.yaml", model_dir, tmp_path,
                               f"prompt.tokenizer={empty}", f"dataset={tmp_path / 'train.parquet'}",
                               f"eval_dataset={there},{tmp_path / 'held_out.jsonl'}")
    with pytest.raises(PreflightError) as info:
        preflight(config, launch, FakeMachine())
    assert [p.split(":")[0] for p in info.value.problems] == ["prompt.tokenizer", "dataset", "eval_dataset"]
    assert f"eval_dataset: {tmp_path / 'held_out.jsonl'} is no such file" in info.value.problems[2]  # not the other


def test_paper_config_passes_on_a_machine_that_has_everything(model_dir: Path, tmp_path: Path):
    config, launch = _paper_ok(CONFIG_DIR / "paper_brts_n4_tier2.yaml", model_dir, tmp_path)
    preflight(config, launch, FakeMachine())


def test_tiny_cpu_passes_preflight_here_with_a_student_dir(tmp_path: Path):
    config, launch = load_train_config("tiny_cpu", [f"student={tmp_path}", f"run_dir={tmp_path / 'runs' / 'x'}"])
    preflight(config, launch)  # the real machine: CPU, bundled tokenizer, the hf engine


# ------------------------------------------------------------------------------------------ command-line check


def test_main_check_malformed_prints_one_line_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: s\nlr: -1\n")
    assert main_check(bad) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "brts train: train.lr: must be > 0, got -1.0\n"


def test_main_check_paper_config_without_gpus(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rc = main_check("paper_brts_n1", [f"student={model_dir}", f"prompt.tokenizer={model_dir}", f"run_dir={tmp_path}"],
                    machine=FakeMachine(cuda=None))
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert (err.startswith("brts train: this machine cannot run the config: needs 8 CUDA GPUs")
            and "CPU-only build" in err)


def test_main_check_tiny_cpu_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main_check("tiny_cpu", [f"run_dir={tmp_path / 'run'}"], student=str(tmp_path)) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.count("\n") == 1 and "ready: 2 ranks on cpu (gloo)" in out
