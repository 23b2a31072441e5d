"""Settings for every command as dataclasses that validate themselves on construction.

A bad value fails before anything heavy loads, with one message naming the field and what is allowed
(``train.lr: must be > 0, got -1.0``). Files are YAML; ``key=value`` overrides from the command line use dotted
keys for nested sections (``prompt.max_prompt_len=512``) and YAML syntax for values.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from brts.shared.config_base import (  # re-exported (__all__): callers import every config name from here
    ConfigError,
    _coerce,
    _merge,
    _Validated,
    from_dict,
    load_config,
    parse_overrides,
    read_config_file,
    save_config,
)
from brts.shared.prompts import DEFAULT_INSTRUCTION_SUFFIX

__all__ = ["BENCHMARKS", "DEFAULT_TEACHER", "MAX_LOGPROB_K", "ConfigError", "EvalConfig", "OverlapMode",
           "PerturbPosition", "PrewarmConfig", "PromptConfig", "SamplingConfig", "ServerConfig", "TeacherConfig",
           "Tier3Policy", "TrainConfig", "_Validated", "_merge", "dataset_names", "from_dict", "is_loopback",
           "load_config", "parse_overrides", "read_config_file", "save_config"]

MAX_LOGPROB_K = 64
#: The teacher that ``server`` names, and the one prompts go to when their route names no teacher.
DEFAULT_TEACHER = "default"
BENCHMARKS = ("aime24", "aime25", "amc23")

#: Where the student's top-K of the overlap score comes from (trainer/selection.py explains both modes).
OverlapMode = Literal["prefix", "position"]
#: What the selection's priority rule does when no candidate is correct (trainer/selection.py, Tier 3).
Tier3Policy = Literal["most_similar", "skip"]
#: Where a perturbation's extra instruction is placed (shared/hints.py: ``perturbed_prompt_ids``).
PerturbPosition = Literal["user", "after_template"]


@dataclass
class PromptConfig(_Validated):
    """How problems become prompt ids (``brts.shared.prompts.PromptSpec``); identical for prewarm, train, eval."""

    SECTION = "prompt"
    tokenizer: str = "qwen2.5-instruct"
    chat_template: str | None = None
    instruction_suffix: str = DEFAULT_INSTRUCTION_SUFFIX
    system_prompt: str | None = None
    max_prompt_len: int = 1024

    def check(self) -> None:
        self.require(self.max_prompt_len >= 1, "max_prompt_len", "must be >= 1")
        self.require(bool(self.tokenizer.strip()), "tokenizer", "must name a bundled tokenizer or a directory")


@dataclass
class SamplingConfig(_Validated):
    """Teacher sampling: the reference's T=0.7, top_p=0.95 (brts-reference §12); top_k -1 = off."""

    SECTION = "sampling"
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = -1
    max_new_tokens: int = 7168
    seed: int = 0

    def check(self) -> None:
        self.require(self.temperature >= 0, "temperature", "must be >= 0")
        self.require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self.require(self.top_k == -1 or self.top_k >= 1, "top_k", "must be -1 (off) or >= 1")
        self.require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig(_Validated):
    """`brts serve`: the teacher engine, its cache and how it is reached."""

    SECTION = "server"
    model: str = ""
    engine: Literal["hf", "vllm", "sglang"] = "hf"
    cache_dir: str = "brts-cache"
    host: str = "127.0.0.1"
    port: int = 50051
    max_logprob_k: int = 16
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tls_cert: str | None = None
    tls_key: str | None = None
    token_file: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_prompts_per_call: int = 256
    max_samples_per_prompt: int = 64
    max_pool_offset: int = 1 << 20
    batch_window_ms: float = 10.0
    probe_timeout_s: float = 300.0  # the start-up probe's bound (a GPU's first generation can take a while)
    metrics_port: int = 0  # Prometheus /metrics over HTTP; 0 = off
    metrics_host: str = "127.0.0.1"  # any other address serves HTTPS with tls_cert/tls_key
    mem_fraction: float = 0.6
    tensor_parallel: int = 1
    data_parallel: int = 1
    sglang_url: str | None = None
    vllm_url: str | None = None  # a running `vllm serve` (OpenAI /v1/completions) instead of the in-process engine
    # exact-scorer replicas behind Score, one per device (each one more copy of the weights); () = one on `device`
    scorer_devices: tuple[str, ...] = ()
    # fresh top-Ks from: "engine" (its own numbers: decode-time for Tier 1, its prefill for the rest), "scorer" (a
    # second, exact forward over each kept candidate), "auto" (engine if the start-up probe finds it agrees)
    teacher_logprobs: Literal["auto", "engine", "scorer"] = "auto"

    def check(self) -> None:
        self.require(bool(self.model.strip()), "model", "must be a model directory")
        self.require(0 <= self.port <= 65535, "port", "must be in 0..65535 (0 picks a free port)")
        self.require(1 <= self.max_logprob_k <= MAX_LOGPROB_K, "max_logprob_k", f"must be in 1..{MAX_LOGPROB_K}")
        self.require(self.max_prompts_per_call >= 1, "max_prompts_per_call", "must be >= 1")
        self.require(self.max_samples_per_prompt >= 1, "max_samples_per_prompt", "must be >= 1")
        self.require(self.max_pool_offset >= 0, "max_pool_offset", "must be >= 0")
        self.require(self.batch_window_ms >= 0, "batch_window_ms", "must be >= 0")
        self.require(self.probe_timeout_s > 0, "probe_timeout_s", "must be > 0 seconds")
        self.require(0 <= self.metrics_port <= 65535, "metrics_port", "must be in 0..65535 (0 = no metrics)")
        self.require(not self.metrics_port or self.metrics_port != self.port, "metrics_port",
                     "must differ from port (the gRPC port)")
        if self.metrics_port and not is_loopback(self.metrics_host) and not (self.tls_cert and self.tls_key):
            self.fail("metrics_host", f"serving metrics on {self.metrics_host} (not loopback) requires TLS; set "
                                      "tls_cert and tls_key (the server's certificate serves the metrics too)")
        self.require(0 < self.mem_fraction < 1, "mem_fraction", "must be in (0, 1)")
        self.require(self.tensor_parallel >= 1, "tensor_parallel", "must be >= 1")
        self.require(self.data_parallel >= 1, "data_parallel", "must be >= 1")
        self._check_engine_urls()
        for i, device in enumerate(self.scorer_devices):
            if device != "cpu" and re.fullmatch(r"cuda(:\d+)?", device) is None:
                self.fail(f"scorer_devices[{i}]", f"must be cpu, cuda or cuda:N; got {device!r}")
        if not is_loopback(self.host):
            missing = [n for n in ("tls_cert", "tls_key", "token_file") if not getattr(self, n)]
            if missing:
                self.fail(
                    "host",
                    f"binding {self.host} (not loopback) requires TLS and a bearer token; set {', '.join(missing)}",
                )
        if bool(self.tls_cert) != bool(self.tls_key):
            self.fail("tls_key", "tls_cert and tls_key must be given together")


    def _check_engine_urls(self) -> None:
        """A URL names a running server of one engine: refuse it with the other engine (it would be ignored)."""
        for name, engine in (("sglang_url", "sglang"), ("vllm_url", "vllm")):
            url = getattr(self, name)
            if url is not None and not url.startswith(("http://", "https://")):
                self.fail(name, f"must be an http:// or https:// URL, e.g. http://127.0.0.1:8000; got {url!r}")
            self.require(url is None or self.engine == engine, "engine", f"must be {engine} with {name}")

    @property
    def engine_url(self) -> str | None:
        """The running engine server this teacher talks to (``sglang_url`` or ``vllm_url``), None = in-process."""
        return self.sglang_url if self.engine == "sglang" else self.vllm_url if self.engine == "vllm" else None


def _check_tolerance(config: Any) -> None:
    tolerance = config.teacher_agreement_tolerance
    config.require(tolerance is None or tolerance > 0, "teacher_agreement_tolerance",
                   "must be > 0 nats, or unset for the default of the teacher's dtype")


def dataset_names(files: Sequence[str]) -> list[str]:
    """The name each evaluation file's results go under: its file stem (``data/held_out.jsonl`` -> ``held_out``)."""
    return [Path(f).stem for f in files]


def _check_dataset_names(config: Any, field_name: str, files: Sequence[str], benchmarks: Sequence[str]) -> None:
    """Evaluation files are named by their stems, so two with the same stem (or a stem that is a bundled
    benchmark's name) would write over each other's results."""
    seen: set[str] = set(benchmarks)
    for name in dataset_names(files):
        if name in seen:
            config.fail(field_name, f"two evaluation sets would both be named {name!r} (files are named by their "
                                    "stem, beside the bundled benchmarks); rename one file")
        seen.add(name)


@dataclass
class PrewarmConfig(_Validated):
    """`brts prewarm`: fill a server's cache over a dataset as its client."""

    SECTION = "prewarm"
    server: str = "127.0.0.1:50051"
    dataset: str = "dapo"
    n_tier1: int = 4
    n_tier2: int = 1
    limit: int | None = None
    concurrency: int = 4
    prompts_per_call: int = 16
    logprob_k: int = 16
    # --check: largest disagreement (nats) of one sequence scored in different batches; None = by the teacher's
    # dtype (shared/agreement.py: float32 1e-4, bfloat16/float16 0.1)
    teacher_agreement_tolerance: float | None = None
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def check(self) -> None:
        self.require(":" in self.server, "server", "must be HOST:PORT")
        self.require(self.n_tier1 >= 1, "n_tier1", "must be >= 1")
        self.require(self.n_tier2 >= 0, "n_tier2", "must be >= 0")
        self.require(self.limit is None or self.limit >= 1, "limit", "must be >= 1 when set")
        self.require(self.concurrency >= 1, "concurrency", "must be >= 1")
        self.require(self.prompts_per_call >= 1, "prompts_per_call", "must be >= 1")
        self.require(1 <= self.logprob_k <= MAX_LOGPROB_K, "logprob_k", f"must be in 1..{MAX_LOGPROB_K}")
        _check_tolerance(self)


@dataclass
class TeacherConfig(_Validated):
    """One teacher server of a training run (``teachers: {NAME: {...}}``), reached like ``server`` is.

    ``expected_fingerprint`` pins the teacher (the start refuses another one); ``sampling`` overrides some of the
    run's ``sampling`` settings for this teacher only (a 7B teacher may want another ``max_new_tokens``): they enter
    the teacher's pool keys, so its prewarm must use them too (``brts prewarm --config TRAIN.yaml --route NAME``)."""

    SECTION = "teacher"
    address: str = ""
    tls_ca: str | None = None
    token_file: str | None = None
    expected_fingerprint: str | None = None
    retries: int = 8
    sampling: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        self.require(":" in self.address, "address", "must be HOST:PORT")
        self.require(self.retries >= 0, "retries", "must be >= 0")
        self.require(self.expected_fingerprint is None or bool(self.expected_fingerprint.strip()),
                     "expected_fingerprint", "must be a teacher fingerprint when set")
        _coerce(self.sampling, SamplingConfig, f"{self.SECTION}.sampling")  # unknown keys and bad values, by name


@dataclass
class TrainConfig(_Validated):
    """`brts train`: the student, its teacher server and the BRTS/OPD algorithm settings (brts-reference §12, §15)."""

    SECTION = "train"
    student: str = ""
    server: str = "127.0.0.1:50051"
    run_dir: str = "runs/brts"
    dataset: str = "dapo"
    seed: int = 0
    max_steps: int = 50
    prompts_per_step: int = 64
    n_rollouts: int = 1
    max_response_len: int = 7168
    rollout_temperature: float = 1.0
    rollout_engine: Literal["hf", "vllm"] = "hf"
    teacher_branch: bool = True
    n_candidates: int = 4
    n_tier2: int = 1
    tier3: Tier3Policy = "most_similar"
    overlap_mode: OverlapMode = "prefix"
    freshness: Literal["cached", "per_epoch", "per_step"] = "cached"
    perturbation: str | None = None
    perturb_slot: int = 1
    truncate_to_student: bool = False
    # where the perturbation's instruction goes: "user" inside the user turn (the paper's text), "after_template"
    # after the assistant marker, as the authors' code does (the first words of the teacher's reasoning)
    perturb_position: PerturbPosition = "user"
    # true: keep a correct Tier-2 rollout even when the leak filter flags it (the paper's counting)
    tier2_keep_leaked: bool = False
    logprob_k: int = 16
    lam: float = 1.0
    lr: float = 1e-6
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    token_budget: int = 32768
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # the dtype of the parameters and the optimizer state; "bfloat16" reproduces the authors' runs (fp32 is exact)
    master_dtype: Literal["float32", "bfloat16"] = "float32"
    # a (K+1)-th tail bucket in each branch's loss (trainer/losses.py, "Tail buckets"); off = the paper's losses
    sc_tail: bool = False
    tc_tail: bool = False
    activation_checkpointing: bool = False
    save_every: int = 20
    eval_every: int = 10
    log_every: int = 1
    keep_checkpoints: int = 3
    server_token_file: str | None = None
    server_tls_ca: str | None = None
    server_retries: int = 8
    # several teacher servers by name (TeacherConfig); empty = the one at ``server``, named "default"
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    # a dataset column whose value names each prompt's teacher (e.g. data_source); no match goes to "default"
    teacher_route: str | None = None
    # Best-of-N across teachers: a prompt's pool is the union of these teachers' Tier-1 windows, chosen among by
    # the same rule (trainer/teacher_pool.py); () = off, each prompt's candidates from its routed teacher only
    candidate_teachers: tuple[str, ...] = ()
    # refuse to start when one sequence scored in different batches disagrees by more (nats); None = by the
    # teacher's dtype (shared/agreement.py: float32 1e-4, bfloat16/float16 0.1)
    teacher_agreement_tolerance: float | None = None
    wandb_project: str | None = None
    eval_benchmarks: tuple[str, ...] = BENCHMARKS
    eval_n: int = 4
    eval_temperature: float = 0.7
    eval_top_p: float = 0.95
    eval_max_new_tokens: int = 0  # 0: max_response_len
    eval_limit: int | None = None
    eval_at_start: bool = False  # also evaluate before the first step (step 0): a before/after in the report
    # JSONL/parquet files of problem/answer rows evaluated beside eval_benchmarks, each named by its file stem
    # (a training set and a held-out set give eval/problems/... and eval/held_out/...); a string is one file
    eval_dataset: tuple[str, ...] = ()
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def check(self) -> None:
        self.require(bool(self.student.strip()), "student", "must be a model directory")
        if self.eval_every or self.eval_at_start:
            self.require(bool(self.eval_benchmarks) or bool(self.eval_dataset), "eval_benchmarks",
                         "must name at least one benchmark or set eval_dataset when eval_every > 0 or eval_at_start")
        _check_dataset_names(self, "eval_dataset", self.eval_dataset, self.eval_benchmarks)
        self.require(self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0 (0 = keep all)")
        self.require(self.server_retries >= 0, "server_retries", "must be >= 0")
        _check_tolerance(self)
        for name in self.eval_benchmarks:
            if name not in BENCHMARKS:
                self.fail("eval_benchmarks", f"unknown benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}")
        self.require(self.eval_n >= 1, "eval_n", "must be >= 1")
        self.require(self.eval_max_new_tokens >= 0, "eval_max_new_tokens", "must be >= 0 (0 = max_response_len)")
        self.require(self.eval_limit is None or self.eval_limit >= 1, "eval_limit", "must be >= 1 when set")
        self.require(":" in self.server, "server", "must be HOST:PORT")
        self._check_teachers()
        self.require(self.max_steps >= 1, "max_steps", "must be >= 1")
        self.require(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
        self.require(self.n_rollouts >= 1, "n_rollouts", "must be >= 1")
        self.require(self.max_response_len >= 1, "max_response_len", "must be >= 1")
        # the losses and the student's top-K are at T=1 (full-vocabulary log-probs of the raw logits): rollouts
        # drawn at another temperature would come from a distribution the loss does not describe (issue #23)
        self.require(self.rollout_temperature == 1.0, "rollout_temperature",
                     "must be 1.0: the student-context loss and the student's top-K are at T=1, as in the paper and "
                     "its code; sampling at another temperature would make the rollouts and the loss disagree")
        self.require(self.n_candidates >= 1, "n_candidates", "must be >= 1")
        self.require(self.n_tier2 >= 0, "n_tier2", "must be >= 0")
        self.require(1 <= self.logprob_k <= MAX_LOGPROB_K, "logprob_k", f"must be in 1..{MAX_LOGPROB_K}")
        self.require(self.lam >= 0, "lam", "must be >= 0")
        self.require(self.lr > 0, "lr", "must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            self.fail("betas", f"must be two numbers in [0, 1), got {list(self.betas)}")
        self.require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self.require(self.grad_clip > 0, "grad_clip", "must be > 0")
        self.require(self.token_budget >= 1, "token_budget", "must be >= 1")
        self.require(self.save_every >= 0, "save_every", "must be >= 0 (0 = only at the end)")
        self.require(self.eval_every >= 0, "eval_every", "must be >= 0 (0 = never)")
        self.require(self.log_every >= 1, "log_every", "must be >= 1")
        if self.perturbation is not None:
            self.require(
                0 <= self.perturb_slot < self.n_candidates, "perturb_slot", f"must be in 0..{self.n_candidates - 1}"
            )


    def _check_teachers(self) -> None:
        for name in self.teachers:
            if re.fullmatch(r"[A-Za-z0-9_-]+", name) is None:
                self.fail(f"teachers.{name}", "a teacher's name is letters, digits, _ and - (it is used in "
                                              "teachers.NAME.FIELD=VALUE overrides and metric names)")
        shorthand = [n for n, default in (("server", "127.0.0.1:50051"), ("server_token_file", None),
                                          ("server_tls_ca", None)) if getattr(self, n) != default]
        if self.teachers and shorthand:
            self.fail(shorthand[0], f"set either server (one teacher, named {DEFAULT_TEACHER}) or teachers, not both; "
                                    f"give it as teachers.{DEFAULT_TEACHER}.address")
        if self.teacher_route is not None:
            self.require(bool(self.teacher_route.strip()), "teacher_route", "must name a dataset column when set")
        names = self.teacher_entries()
        for name in self.candidate_teachers:
            if name not in names:
                self.fail("candidate_teachers", f"unknown teacher {name!r}; teachers: {', '.join(names)}")
        if self.candidate_teachers:
            self.require(len(set(self.candidate_teachers)) == len(self.candidate_teachers) >= 2,
                         "candidate_teachers", "must list two or more different teachers (one teacher's pool is "
                         "the routed run's)")
            self.require(self.teacher_branch, "candidate_teachers", "needs teacher_branch: true (it pools the "
                                                                     "teacher-context branch's candidates)")

    def teacher_entries(self) -> dict[str, TeacherConfig]:
        """Every teacher by name: ``teachers``, or the one ``server`` names, called ``default``."""
        if self.teachers:
            return dict(self.teachers)
        return {DEFAULT_TEACHER: TeacherConfig(self.server, self.server_tls_ca, self.server_token_file, None,
                                               self.server_retries)}

    def teacher_sampling(self, name: str) -> SamplingConfig:
        """The run's ``sampling`` with the teacher's own overrides on top (they enter its pool keys)."""
        return from_dict(SamplingConfig, {**asdict(self.sampling), **self.teacher_entries()[name].sampling},
                         f"train.teachers.{name}.sampling")


@dataclass
class EvalConfig(_Validated):
    """`brts eval`: mean/pass/majority@n on the bundled benchmarks, as the reference samples (§13)."""

    SECTION = "eval"
    model: str = ""
    benchmarks: tuple[str, ...] = BENCHMARKS
    dataset: tuple[str, ...] = ()  # JSONL/parquet files evaluated beside benchmarks, each named by its file stem
    n: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 31744
    engine: Literal["hf", "vllm"] = "vllm"
    limit: int | None = None
    out: str = "eval-out"
    seed: int = 0
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 42
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def check(self) -> None:
        self.require(bool(self.model.strip()), "model", "must be a model directory")
        for name in self.benchmarks:
            if name not in BENCHMARKS:
                self.fail("benchmarks", f"unknown benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}")
        self.require(bool(self.benchmarks) or bool(self.dataset), "benchmarks",
                     "must name at least one benchmark or give dataset")
        _check_dataset_names(self, "dataset", self.dataset, self.benchmarks)
        self.require(self.n >= 1, "n", "must be >= 1")
        self.require(self.temperature >= 0, "temperature", "must be >= 0")
        self.require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self.require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        self.require(self.limit is None or self.limit >= 1, "limit", "must be >= 1 when set")
        self.require(self.bootstrap_resamples >= 1, "bootstrap_resamples", "must be >= 1")

