"""The ``sglang`` engine: SGLang's native ``/generate`` API, offline (``sglang.Engine``) or over HTTP.

Why an adapter with its own request builder and reply parser (engine-apis.md §1): SGLang cannot run on the
project's CPU machines (platform-notes §4), so what can be tested here is exactly what crosses the boundary:
the request we send and how we read the reply. Both transports take the same payload and return the same
per-sample reply dicts, so one builder and one parser serve both.

Requests: one entry per sample (``n``-free repetition: the prompt repeated once per seed, each with its own
``sampling_seed``), every sampling field explicit (the server's ``--sampling-defaults model`` would otherwise
pull defaults from generation_config.json), ``stop_token_ids`` = the model's EOS ids, ``no_stop_trim`` so the
EOS stays in ``output_ids``. Per-sample seeds are honoured only by a server running with
``--enable-deterministic-inference`` (SGLang's FlashInfer sampler rejects ``sampling_seed``); the offline
transport turns that on by default.

Replies: ``meta_info.finish_reason`` is ``{"type": "stop", "matched": <eos id>}`` or ``{"type": "length",
"length": N}``; a stop whose EOS was trimmed anyway (an older server, or ``no_stop_trim`` ignored) gets it put
back, so every "stop" sample ends with exactly one EOS (the proto's convention). Log-prob entries are
``[logprob, token_id, text|null]`` triples; top-k rows may hold fewer than K entries (padded with -1/-inf) and
the entry at ``logprob_start_len`` is null.

Raw T=1 numbers (engine-apis.md §4): generation-time log-probs are the model's ``log_softmax`` before temperature
only when the server runs with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``, a server-wide environment variable, not a
request field (older SGLang read ``RETURN_ORIGINAL_LOGPROB``). The offline transport starts SGLang itself, so it
sets both in this process's environment before SGLang spawns its scheduler (which reads them); a server at a
``base_url`` was started by someone else and cannot be changed from here: the server's start-up probe compares
this engine's numbers with the exact scorer at the sampling temperature and catches a server started without it.
Prefill (input) log-probs ignore temperature in every version: ``score_via_prefill`` is T=1 either way.
``deterministic`` (the proto's ``engine_deterministic``) is whether the server runs
``--enable-deterministic-inference``: the offline transport turns it on (unless ``engine_kwargs`` say otherwise);
for ``base_url`` only the caller knows (``deterministic=``, False unless told).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from brts.shared.engines.base import (
    EngineOptions,
    Generation,
    GenerationRequest,
    SampleLogprobs,
    SamplingParams,
    ScoreItem,
    ScoreOutput,
    check_eos_convention,
    check_token_ids,
    validate_generation,
)
from brts.shared.topk import PAD_LOGPROB, TopK, topk_from_rows

__all__ = [
    "ORIGINAL_LOGPROB_ENV",
    "SGLANG_MISSING",
    "SGLangEngine",
    "build",
    "build_generate_payload",
    "build_prefill_payload",
    "parse_generate_reply",
    "parse_prefill_reply",
]

SGLANG_MISSING = (
    "sglang is not installed (it needs CUDA; see platform-notes §4): install the 'sglang' extra in its own GPU "
    "environment (pip install -e '.[sglang]'), or use transport='http' against a running sglang.launch_server"
)

Transport = Literal["offline", "http"]
#: Payload keys that ``sglang.Engine.generate`` accepts (its signature has no ``return_text_in_logprobs``).
_OFFLINE_KEYS = frozenset(
    {"input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob"}
)
#: What the offline transport sets for the SGLang it starts: raw T=1 generation log-probs (module docstring); the
#: second name is the one SGLang read before it prefixed its variables.
ORIGINAL_LOGPROB_ENV = {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1", "RETURN_ORIGINAL_LOGPROB": "1"}


def _sampling_dict(seed: int, sampling: SamplingParams, eos_token_ids: Sequence[int]) -> dict[str, Any]:
    return {
        "max_new_tokens": sampling.max_new_tokens,
        "min_new_tokens": 0,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,  # -1 = off, as in SGLang
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "n": 1,
        "sampling_seed": int(seed),
        "stop_token_ids": [int(e) for e in eos_token_ids],
        "ignore_eos": False,
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }


def build_generate_payload(
    requests: Sequence[GenerationRequest], sampling: SamplingParams, eos_token_ids: Sequence[int], k: int | None
) -> dict[str, Any]:
    """The ``/generate`` body for all requests × seeds: one batch entry per sample, in request then seed order."""
    input_ids, params = [], []
    for req in requests:
        for seed in req.seeds:
            input_ids.append([int(t) for t in req.prompt_ids])
            params.append(_sampling_dict(seed, sampling, eos_token_ids))
    return {
        "input_ids": input_ids,
        "sampling_params": params,
        "return_logprob": k is not None,
        "logprob_start_len": -1,  # output tokens only
        "top_logprobs_num": int(k) if k is not None else 0,
        "return_text_in_logprobs": False,
        "stream": False,
    }


def _finish(meta: Mapping[str, Any], where: str) -> tuple[str, Any]:
    fr = meta.get("finish_reason")
    if isinstance(fr, str):  # some front-ends flatten it
        fr = {"type": fr}
    if not isinstance(fr, Mapping) or fr.get("type") not in ("stop", "length"):
        raise RuntimeError(f"{where}: sglang finished with {fr!r}")
    return str(fr["type"]), fr.get("matched")


def _triples(value: Any, where: str) -> list[tuple[int, float | None]]:
    """``[[lp, id, text], ...]`` → [(id, lp)], keeping null log-probs as None."""
    if value is None:
        return []
    out = []
    for entry in value:
        if entry is None:
            continue
        if not isinstance(entry, (list, tuple)) or len(entry) < 2:
            raise RuntimeError(f"{where}: expected [logprob, token_id, text] entries, got {entry!r}")
        lp = None if entry[0] is None else float(entry[0])
        out.append((int(entry[1]), lp))
    return out


def parse_generate_reply(
    item: Mapping[str, Any], eos_token_ids: Sequence[int], k: int | None, where: str = "reply"
) -> SampleLogprobs:
    """One sample's reply dict → SampleLogprobs (empty log-prob arrays when ``k`` is None).

    Tokens come from ``output_ids`` (or, if absent, from ``output_token_logprobs``); a "stop" must have matched
    an EOS id, which ends the sample exactly once; anything else (abort, stop strings, stray EOS) is an error.
    """
    meta = item.get("meta_info")
    if not isinstance(meta, Mapping):
        raise RuntimeError(f"{where}: reply has no meta_info")
    reason, matched = _finish(meta, where)
    token_lps = _triples(meta.get("output_token_logprobs"), f"{where}.output_token_logprobs")
    if item.get("output_ids") is not None:
        tokens = [int(t) for t in item["output_ids"]]
    elif k is not None:
        tokens = [tid for tid, _ in token_lps]
    else:
        raise RuntimeError(f"{where}: reply has neither output_ids nor output_token_logprobs")
    eos = set(int(e) for e in eos_token_ids)
    if reason == "stop":
        if isinstance(matched, bool) or not isinstance(matched, (int, type(None))):
            raise RuntimeError(f"{where}: stopped on {matched!r}, not on an EOS token (no stop strings are sent)")
        if matched is not None:
            if int(matched) not in eos:
                raise RuntimeError(f"{where}: stopped on token {matched}, which is not one of eos {sorted(eos)}")
            if not tokens or tokens[-1] != int(matched):
                tokens.append(int(matched))  # the server trimmed the stop token: put the one EOS back
    check_eos_convention(tokens, reason, eos_token_ids, where)
    gen = Generation(tuple(tokens), reason)  # type: ignore[arg-type]
    if k is None:
        empty = TopK(np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32))
        return SampleLogprobs(gen, np.zeros(0, np.float32), empty)
    if len(token_lps) != len(tokens):
        raise RuntimeError(f"{where}: {len(token_lps)} output_token_logprobs for {len(tokens)} tokens")
    chosen = np.empty(len(tokens), np.float32)
    for t, ((tid, lp), tok) in enumerate(zip(token_lps, tokens)):
        if tid != tok or lp is None:
            raise RuntimeError(f"{where}: output_token_logprobs[{t}] is ({tid}, {lp}) for token {tok}")
        chosen[t] = lp
    top = meta.get("output_top_logprobs") or []
    if len(top) != len(tokens):
        raise RuntimeError(f"{where}: {len(top)} output_top_logprobs rows for {len(tokens)} tokens")
    rows = [_triples(r, f"{where}.output_top_logprobs[{t}]") for t, r in enumerate(top)]
    return SampleLogprobs(gen, chosen, topk_from_rows(rows, k))


def _check_items(items: Sequence[ScoreItem], k: int, vocab_size: int, max_context: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k: must be an integer >= 1, got {k!r}")
    for i, it in enumerate(items):
        check_token_ids(it.token_ids, vocab_size, max_context, f"items[{i}].token_ids")
        n = len(it.token_ids)
        if not 1 <= it.response_start < n:
            raise ValueError(f"items[{i}].response_start: must be in 1..{n - 1}, got {it.response_start}")
        if it.candidate_ids is not None:
            cand = np.asarray(it.candidate_ids)
            rows = n - it.response_start
            if cand.ndim != 2 or cand.shape[0] != rows or cand.dtype.kind not in "iu":
                raise ValueError(f"items[{i}].candidate_ids: must be an integer array [{rows}, K'], got "
                                 f"{cand.dtype} {cand.shape}")
            if ((cand < -1) | (cand >= vocab_size)).any():
                raise ValueError(f"items[{i}].candidate_ids: ids must be -1 or in 0..{vocab_size - 1}")


def build_prefill_payload(items: Sequence[ScoreItem], k: int) -> dict[str, Any]:
    """slime's prefill scoring call: no new tokens, log-probs from the last prompt token on.

    ``logprob_start_len = response_start - 1`` (not 0, which defeats the radix cache and can OOM); the entry at
    that position comes back null. Candidate ids go as the per-request union in ``token_ids_logprob``, the only
    form released SGLang serves (§1 (iii)): dense [rows, |union|], fine for a helper, not for the hot path.
    """
    payload: dict[str, Any] = {
        "input_ids": [[int(t) for t in it.token_ids] for it in items],
        "sampling_params": [{"max_new_tokens": 0, "temperature": 1.0, "skip_special_tokens": False} for _ in items],
        "return_logprob": True,
        "logprob_start_len": [it.response_start - 1 for it in items],
        "top_logprobs_num": int(k),
        "return_text_in_logprobs": False,
        "stream": False,
    }
    if any(it.candidate_ids is not None for it in items):
        payload["token_ids_logprob"] = [
            [] if it.candidate_ids is None else sorted({int(c) for c in np.asarray(it.candidate_ids).ravel() if c >= 0})
            for it in items
        ]
    return payload


def parse_prefill_reply(item: Mapping[str, Any], score_item: ScoreItem, k: int, where: str = "reply") -> ScoreOutput:
    """One prefill reply → ScoreOutput: drop the null entry at the start position, keep one row per response token."""
    meta = item.get("meta_info")
    if not isinstance(meta, Mapping):
        raise RuntimeError(f"{where}: reply has no meta_info")
    rows = len(score_item.token_ids) - score_item.response_start
    tok = meta.get("input_token_logprobs") or []
    top = meta.get("input_top_logprobs") or []
    if len(tok) != rows + 1 or len(top) != rows + 1:
        raise RuntimeError(f"{where}: expected {rows + 1} input log-prob entries (the first null), got "
                           f"{len(tok)} token and {len(top)} top-k entries")
    for t, (tid, lp) in enumerate(_triples(tok[1:], f"{where}.input_token_logprobs")):
        if tid != score_item.token_ids[score_item.response_start + t] or lp is None:
            raise RuntimeError(f"{where}: input_token_logprobs[{t + 1}] is ({tid}, {lp}), not a response token")
    topk = topk_from_rows([_triples(r, f"{where}.input_top_logprobs[{t + 1}]") for t, r in enumerate(top[1:])], k)
    cand_lps = None
    if score_item.candidate_ids is not None:
        cand = np.asarray(score_item.candidate_ids)
        by_id = meta.get("input_token_ids_logprobs") or []
        if len(by_id) != rows + 1:
            raise RuntimeError(f"{where}: expected {rows + 1} input_token_ids_logprobs entries, got {len(by_id)}")
        cand_lps = np.full(cand.shape, PAD_LOGPROB, np.float32)
        for t in range(rows):
            have = {tid: lp for tid, lp in _triples(by_id[t + 1], f"{where}.input_token_ids_logprobs[{t + 1}]")}
            for j, c in enumerate(cand[t]):
                if c >= 0:
                    if have.get(int(c)) is None:
                        raise RuntimeError(f"{where}: no log-prob for candidate id {int(c)} at row {t}")
                    cand_lps[t, j] = have[int(c)]
    return ScoreOutput(topk, cand_lps)


def _read_model_info(model_path: str) -> tuple[int, int, tuple[int, ...]]:
    """vocab (logits dimension), context and EOS ids from a local HF folder, the same sources the hf engine uses."""
    from transformers import AutoConfig, GenerationConfig

    cfg = AutoConfig.from_pretrained(model_path, local_files_only=True)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    eos: list[int] = []
    try:
        ge = GenerationConfig.from_pretrained(model_path, local_files_only=True).eos_token_id
        eos += [ge] if isinstance(ge, int) else list(ge or [])
    except OSError:
        pass
    try:
        from brts.shared.tokenizer import load_tokenizer

        te = load_tokenizer(model_path).eos_token_id
        eos += [te] if te is not None else []
    except (ValueError, OSError):
        pass
    ce = getattr(text_cfg, "eos_token_id", None)
    eos += [ce] if isinstance(ce, int) else list(ce or [])
    return int(text_cfg.vocab_size), int(text_cfg.max_position_embeddings), tuple(dict.fromkeys(int(e) for e in eos))


def _start_offline(kwargs: dict[str, Any]) -> Any:
    """``sglang.Engine(**kwargs)`` with ``ORIGINAL_LOGPROB_ENV`` set first: SGLang reads it in its scheduler
    process (spawned from this one's environment), some versions once at import, so it must be there before
    SGLang is imported and started. It stays set for this process (it only concerns SGLang)."""
    os.environ.update(ORIGINAL_LOGPROB_ENV)
    try:
        import sglang
    except ImportError as exc:
        raise ImportError(SGLANG_MISSING) from exc
    return sglang.Engine(**kwargs)


class SGLangEngine:
    """``GenerationEngine`` over SGLang: ``transport="offline"`` (in-process ``sglang.Engine``) or ``"http"``
    (``base_url`` of a running ``sglang.launch_server``)."""

    name = "sglang"

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        transport: Transport = "offline",
        base_url: str | None = None,
        vocab_size: int | None = None,
        max_context: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        mem_fraction: float | None = None,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        dtype: str = "auto",
        timeout_s: float = 3600.0,
        engine_kwargs: Mapping[str, Any] | None = None,
        deterministic: bool = False,
    ) -> None:
        """Model facts come from ``model_path`` (a local HF folder) unless given explicitly; an HTTP client of a
        remote server with no local copy passes ``vocab_size``, ``max_context`` and ``eos_token_ids``.

        ``mem_fraction`` is SGLang's ``mem_fraction_static``: leave room for the exact scorer on a shared GPU.
        ``deterministic``: with ``transport="http"``, whether that server runs ``--enable-deterministic-inference``
        (the offline transport knows what it started and ignores this).
        """
        if transport not in ("offline", "http"):
            raise ValueError(f"transport: must be 'offline' or 'http', got {transport!r}")
        if transport == "http" and not base_url:
            raise ValueError("base_url: required with transport='http' (e.g. 'http://127.0.0.1:30000')")
        if transport == "offline" and model_path is None:
            raise ValueError("model_path: required with transport='offline'")
        if mem_fraction is not None and not 0 < mem_fraction < 1:
            raise ValueError(f"mem_fraction: must be in (0, 1), got {mem_fraction!r}")
        info: tuple[Any, Any, tuple[int, ...]] = (None, None, ())
        if vocab_size is None or max_context is None or eos_token_ids is None:
            if model_path is None:
                raise ValueError("model_path: required unless vocab_size, max_context and eos_token_ids are all given")
            info = _read_model_info(os.fspath(model_path))
        self.vocab_size = int(vocab_size if vocab_size is not None else info[0])  # type: ignore[arg-type]
        self.max_context = int(max_context if max_context is not None else info[1])  # type: ignore[arg-type]
        self.eos_token_ids = tuple(int(e) for e in (eos_token_ids if eos_token_ids is not None else info[2]))
        if self.vocab_size < 1 or self.max_context < 2:
            raise ValueError(f"vocab_size/max_context: got {self.vocab_size}/{self.max_context}")
        if not self.eos_token_ids:
            raise ValueError("eos_token_ids: none given and none found in the model folder")
        for e in self.eos_token_ids:
            if not 0 <= e < self.vocab_size:
                raise ValueError(f"eos_token_ids: id {e} is outside 0..{self.vocab_size - 1}")
        self.transport: Transport = transport
        self.base_url = base_url.rstrip("/") if base_url else None
        self.timeout_s = timeout_s
        self._engine: Any = None
        self._closed = False
        self.deterministic = bool(deterministic) if transport == "http" else False
        if transport == "offline":
            kwargs: dict[str, Any] = {
                "model_path": os.fspath(model_path),  # type: ignore[arg-type]
                "tp_size": tensor_parallel_size,
                "random_seed": seed,
                "dtype": dtype,
                "context_length": self.max_context,
                "enable_deterministic_inference": True,  # per-sample sampling_seed needs it
            }
            if mem_fraction is not None:
                kwargs["mem_fraction_static"] = mem_fraction
            kwargs.update(engine_kwargs or {})
            self._engine = _start_offline(kwargs)
            self.deterministic = bool(kwargs.get("enable_deterministic_inference"))

    # ------------------------------------------------------------------ transport

    def _call(self, payload: dict[str, Any], expected: int) -> list[Mapping[str, Any]]:
        """Send one batched request; returns one reply dict per batch entry, in order."""
        if self._closed:
            raise RuntimeError("SGLangEngine: call after close()")
        if self.transport == "offline":
            # sglang.Engine.generate takes the GenerateReqInput fields, minus the HTTP-only ones.
            reply = self._engine.generate(**{key: v for key, v in payload.items() if key in _OFFLINE_KEYS})
        else:
            req = urllib.request.Request(
                f"{self.base_url}/generate",
                data=json.dumps(payload).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    reply = json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                body = exc.read()[:500].decode(errors="replace")
                raise RuntimeError(f"sglang /generate returned HTTP {exc.code}: {body}") from exc
            except urllib.error.URLError as exc:
                raise ConnectionError(f"sglang server at {self.base_url} is not reachable: {exc.reason}") from exc
        if isinstance(reply, Mapping):
            reply = [reply]
        if not isinstance(reply, list) or len(reply) != expected:
            got = len(reply) if isinstance(reply, list) else type(reply).__name__
            raise RuntimeError(f"sglang returned {got} replies for {expected} batch entries")
        return reply

    # ------------------------------------------------------------------ protocol

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[list[Generation]]:
        """All requests × seeds in one ``/generate`` batch; per request one Generation per seed, in seed order."""
        return [[s.generation for s in per] for per in self._run(requests, sampling, None)]

    def generate_with_logprobs(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams, k: int
    ) -> list[list[SampleLogprobs]]:
        """As ``generate``, plus the sampled token's log-prob and the top-``k`` at each generated position: raw
        T=1 numbers when the server returns original log-probs (module docstring), which the offline transport
        ensures and the start-up probe checks."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k: must be an integer >= 1, got {k!r}")
        return self._run(requests, sampling, k)

    def _run(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams, k: int | None
    ) -> list[list[SampleLogprobs]]:
        validate_generation(requests, sampling, self.vocab_size, self.max_context)
        owner = [(i, j) for i, req in enumerate(requests) for j in range(len(req.seeds))]
        out: list[list[SampleLogprobs]] = [[] for _ in requests]
        if not owner:
            return out
        replies = self._call(build_generate_payload(requests, sampling, self.eos_token_ids, k), len(owner))
        for (i, j), item in zip(owner, replies):
            out[i].append(parse_generate_reply(item, self.eos_token_ids, k, f"requests[{i}].seeds[{j}]"))
        return out

    def score_via_prefill(self, items: Sequence[ScoreItem], k: int) -> list[ScoreOutput]:
        """Teacher top-``k`` (and candidate-id log-probs) along given sequences by SGLang prefill, at T=1.

        Items without ``candidate_ids`` (the engine-prefill source of issue #21) get ``candidate_logprobs`` None,
        as from the vllm engine; unlike vllm's, this prefill also serves candidate ids (as one union per request,
        the only form released SGLang has), so items that carry them get their log-probs. Not the default
        scorer: its numerics are the serving kernels', not the exact fp32 forward (engine-apis.md §3).
        """
        _check_items(items, k, self.vocab_size, self.max_context)
        if not items:
            return []
        replies = self._call(build_prefill_payload(items, k), len(items))
        return [parse_prefill_reply(r, it, k, f"items[{i}]") for i, (r, it) in enumerate(zip(replies, items))]

    def close(self) -> None:
        """Shut the offline engine down (HTTP: nothing to free; the server belongs to whoever started it)."""
        self._closed = True
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()


def build(model: str | os.PathLike[str], options: EngineOptions) -> SGLangEngine:
    """The registry's builder: with ``options.url`` a client of that running ``sglang.launch_server``; otherwise an
    offline ``sglang.Engine`` with ``mem_fraction``, ``tensor_parallel`` and ``data_parallel`` (SGLang's dp_size).
    ``options.dtype`` is not passed on (SGLang applies its own ``"auto"``), as the server did before the registry."""
    if options.url:
        return SGLangEngine(model, transport="http", base_url=options.url)
    dp = {"dp_size": options.data_parallel} if options.data_parallel > 1 else None
    return SGLangEngine(model, mem_fraction=options.mem_fraction, tensor_parallel_size=options.tensor_parallel,
                        engine_kwargs=dp)
