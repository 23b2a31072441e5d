"""The ``hf`` engine: transformers models on CPU or CUDA, the embedded default.

Why a hand-written decode loop instead of ``model.generate``: a sample must be reproducible from its seed
whatever else is in the batch (base.py), and ``generate`` draws from one global RNG stream shared by all rows,
so a sample would change when its neighbours change. Here every row owns a ``torch.Generator`` seeded with its
seed and draws exactly one uniform per step, which it turns into a token by inverse-CDF over its own filtered
distribution; so the tokens depend only on the row's logits and seed (up to float rounding of batched matmuls).
That rounding is what limits it: on CPU in fp32 samples are identical alone and in any batch (tested); on an H100
in bf16 the logits of a row change in the last bf16 place with the batch's shape (padding, row count), so only
32-90% of samples survive a re-batching there (bench/results/gpu_engine_after_fix.json); fp32 with top_k
was 100%. The cache makes this moot for serving: a pool entry is drawn once and then read, never redrawn.

All requests × seeds go through one decode loop (or a few, bounded by ``max_batch_size`` and
``max_batch_tokens``), left-padded with explicit position ids and a KV cache; rows that finish are dropped from
the cache. Lengths are tracked explicitly, never from ``id != pad`` (pad may equal EOS): a row that samples any
of ``eos_token_ids`` ends with exactly that one EOS and ``"stop"``; a row cut at ``max_new_tokens`` is
``"length"``.

Decode-time log-probs (``generate_with_logprobs``): at every step the loop also takes ``log_softmax`` of the raw
fp32 logits (before temperature, top-k and top-p, so the T=1 teacher distribution the scorer computes) and its
top-k, for the rows still decoding only; finished rows are already out of the batch. ``generate`` skips this
entirely: student rollouts and ``brts eval`` should not pay a full-vocabulary log-softmax and top-k per step.
``deterministic`` (the proto's ``engine_deterministic``) is True on CPU, where fp32 samples are identical in any
batch (above) and their log-probs move by float rounding only (measured 5e-7 nats between a sample alone and in
a left-padded batch: equal tokens and top-K ids, not equal bits); False on CUDA.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from brts.shared.engines.base import (
    EngineOptions,
    Generation,
    GenerationRequest,
    SampleLogprobs,
    SamplingParams,
    check_token_ids,
    is_int,
)
from brts.shared.engines.loading import load_causal_lm, logits_dim
from brts.shared.engines.scorer import DEFAULT_CHUNK_SIZE, TorchScorer
from brts.shared.topk import PAD_ID, TopK

__all__ = ["HFEngine", "build"]

#: Top-p first looks at this many most likely tokens; only rows whose nucleus is wider fall back to a full sort.
_NUCLEUS_PROBE = 64


class _StepLogprobs:
    """The T=1 log-probs the decode loop takes at each step, kept on the device until the loop ends and then
    copied to the host in one transfer (a copy per step would stall the GPU every token)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._rows: list[torch.Tensor] = []  # request row of each active slot, per step
        self._steps: list[int] = []
        self._vals: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []
        self._chosen: list[torch.Tensor] = []

    def record(self, logits: torch.Tensor, active: list[int], sampled: torch.Tensor) -> None:
        """``logits`` [B, V] of the active slots (``active[slot]`` = request row), ``sampled`` [B] their tokens."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        vals, ids = torch.topk(logp, self.k, dim=-1, sorted=True)
        self._vals.append(vals)
        self._ids.append(ids)
        self._chosen.append(logp.gather(1, sampled[:, None])[:, 0])
        self._rows.append(torch.tensor(active, dtype=torch.long))
        self._steps.append(len(active))

    def result(self, lengths: list[int]) -> list[tuple[np.ndarray, TopK]]:
        """Per request row: token log-probs [T] and top-k [T, k]; row r's t-th token was drawn at step t."""
        n, longest = len(lengths), max(lengths, default=0)
        vals = np.full((n, longest, self.k), -np.inf, np.float32)
        ids = np.full((n, longest, self.k), PAD_ID, np.int32)
        chosen = np.zeros((n, longest), np.float32)
        if self._rows:
            rows = torch.cat(self._rows).numpy()
            steps = np.repeat(np.arange(len(self._steps)), self._steps)
            vals[rows, steps] = np.minimum(torch.cat(self._vals).cpu().numpy(), 0.0)  # guard rounding above 0
            ids[rows, steps] = torch.cat(self._ids).to(torch.int32).cpu().numpy()
            chosen[rows, steps] = np.minimum(torch.cat(self._chosen).cpu().numpy(), 0.0)
        ids[np.isneginf(vals)] = PAD_ID  # a -inf log-prob is no candidate (the TopK padding convention)
        return [(chosen[r, :t].copy(), TopK(ids[r, :t].copy(), vals[r, :t].copy())) for r, t in enumerate(lengths)]


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


class HFEngine:
    """``GenerationEngine`` over a loaded transformers causal LM; ``scorer()`` shares the same model."""

    name = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any | None = None,
        *,
        eos_token_ids: Sequence[int] | None = None,
        max_batch_size: int = 64,
        max_batch_tokens: int = 1 << 16,
        scorer_chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        for field, value in (("max_batch_size", max_batch_size), ("max_batch_tokens", max_batch_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}: must be an integer >= 1, got {value!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.vocab_size = logits_dim(model)
        ctx = getattr(model.config, "max_position_embeddings", None)
        if not isinstance(ctx, int) or ctx < 2:
            raise ValueError(f"model.config.max_position_embeddings: must be an integer >= 2, got {ctx!r}")
        self.max_context = ctx
        if eos_token_ids is None:
            gen_cfg = getattr(model, "generation_config", None)
            found = list(_as_id_tuple(getattr(gen_cfg, "eos_token_id", None)))
            if tokenizer is not None:
                found += list(_as_id_tuple(getattr(tokenizer, "eos_token_id", None)))
            eos_token_ids = tuple(dict.fromkeys(found))
        self.eos_token_ids = tuple(int(e) for e in eos_token_ids)
        if not self.eos_token_ids:
            raise ValueError("eos_token_ids: none given and none found in the generation config or tokenizer")
        for e in self.eos_token_ids:
            if not 0 <= e < self.vocab_size:
                raise ValueError(f"eos_token_ids: id {e} is outside 0..{self.vocab_size - 1}")
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self._scorer_chunk_size = scorer_chunk_size
        self._scorer: TorchScorer | None = None
        self._closed = False
        #: Whether the engine's numbers do not depend on how requests are batched (module docstring): on CPU the
        #: samples do not, and their log-probs only by float rounding; on CUDA bf16 samples change with the batch.
        self.deterministic = self.device.type == "cpu"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        **kwargs: Any,
    ) -> "HFEngine":
        """Load model (and its tokenizer, when the folder has one) from a local folder."""
        from brts.shared.tokenizer import load_tokenizer

        model = load_causal_lm(path, device, dtype)
        tokenizer = kwargs.pop("tokenizer", None)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(path)
            except ValueError:
                tokenizer = None  # a weights-only folder: EOS must then come from generation_config.json
        return cls(model, tokenizer, **kwargs)

    def scorer(self) -> TorchScorer:
        """The exact scorer on the same model object (no second copy of the weights)."""
        if self._scorer is None:
            self._scorer = TorchScorer(self.model, chunk_size=self._scorer_chunk_size, max_context=self.max_context)
        return self._scorer

    def close(self) -> None:
        """Drop cached scorer state and CUDA cache; the model object belongs to whoever passed it in."""
        self._closed = True
        self._scorer = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ validation

    def _validate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> None:
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling: expected SamplingParams, got {type(sampling).__name__}")
        if sampling.max_new_tokens >= self.max_context:
            raise ValueError(f"sampling.max_new_tokens: {sampling.max_new_tokens} leaves no room for a prompt in the "
                             f"engine's context of {self.max_context}")
        for i, req in enumerate(requests):
            if not isinstance(req, GenerationRequest):
                raise ValueError(f"requests[{i}]: expected a GenerationRequest, got {type(req).__name__}")
            field = f"requests[{i}].prompt_ids"
            check_token_ids(req.prompt_ids, self.vocab_size, self.max_context, field)
            if len(req.prompt_ids) + sampling.max_new_tokens > self.max_context:
                raise ValueError(
                    f"{field}: {len(req.prompt_ids)} prompt tokens + max_new_tokens={sampling.max_new_tokens} exceed "
                    f"the engine's context of {self.max_context}"
                )
            for j, seed in enumerate(req.seeds):
                if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
                    raise ValueError(f"requests[{i}].seeds[{j}]: must be an integer in 0..2**63-1, got {seed!r}")

    # ------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[list[Generation]]:
        """All requests × seeds, batched; returns per request one Generation per seed, in seed order.

        A request with no seeds gets an empty list. Everything is validated before any compute.
        """
        return [[s.generation for s in per] for per in self._run(requests, sampling, None)]

    def generate_with_logprobs(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams, k: int
    ) -> list[list[SampleLogprobs]]:
        """As ``generate`` (the same tokens for the same seeds), plus at each generated position the sampled
        token's log-prob and the top-``k``: the raw T=1 full-vocabulary log-softmax of the logits the token was
        drawn from, taken before temperature / top-k / top-p, so it equals the exact scorer's numbers over
        (prompt + response) up to float rounding (fp32: < 1e-4 nats, tested)."""
        if not is_int(k) or not 1 <= int(k) <= self.vocab_size:
            raise ValueError(f"k: must be an integer in 1..{self.vocab_size} (the vocabulary), got {k!r}")
        return self._run(requests, sampling, int(k))

    def _run(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams, k: int | None
    ) -> list[list[SampleLogprobs]]:
        """Validate, then decode in groups; with ``k`` None the log-prob arrays are empty (nothing computed)."""
        if self._closed:
            raise RuntimeError("HFEngine: generate() after close()")
        self._validate(requests, sampling)
        rows = [(i, j) for i, req in enumerate(requests) for j in range(len(req.seeds))]
        out: list[list[SampleLogprobs | None]] = [[None] * len(req.seeds) for req in requests]
        empty = (np.zeros(0, np.float32), TopK(np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32)))
        for group in self._groups(rows, requests, sampling.max_new_tokens):
            prompts = [requests[i].prompt_ids for i, _ in group]
            seeds = [requests[i].seeds[j] for i, j in group]
            gens, logprobs = self._decode(prompts, seeds, sampling, k)
            for b, ((i, j), gen) in enumerate(zip(group, gens)):
                chosen, topk = logprobs[b] if logprobs is not None else empty
                out[i][j] = SampleLogprobs(gen, chosen, topk)
        return [[s for s in per if s is not None] for per in out]

    def _groups(
        self, rows: list[tuple[int, int]], requests: Sequence[GenerationRequest], max_new: int
    ) -> list[list[tuple[int, int]]]:
        """Split rows (sorted by prompt length, so left padding stays small) under the memory bounds."""
        rows = sorted(rows, key=lambda r: len(requests[r[0]].prompt_ids))
        groups: list[list[tuple[int, int]]] = []
        for r in rows:
            if groups:
                g = groups[-1]
                longest = len(requests[r[0]].prompt_ids)  # sorted ascending: the newcomer is the longest
                if len(g) < self.max_batch_size and (len(g) + 1) * (longest + max_new) <= self.max_batch_tokens:
                    g.append(r)
                    continue
            groups.append([r])
        return groups

    def _left_padded(self, prompts: list[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids, attention mask and position ids [B, longest] of the prompts, left-padded, on the device."""
        n = len(prompts)
        longest = max(len(p) for p in prompts)
        ids = torch.full((n, longest), self.eos_token_ids[0], dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, longest - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[b, longest - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    @torch.inference_mode()
    def _decode(
        self, prompts: list[Sequence[int]], seeds: list[int], sampling: SamplingParams, k: int | None = None
    ) -> tuple[list[Generation], list[tuple[np.ndarray, TopK]] | None]:
        """One left-padded KV-cache decode loop over the given rows; with ``k``, also the T=1 log-probs of the
        rows still decoding at each step (None otherwise: nothing extra is computed)."""
        n = len(prompts)
        ids, mask, positions = self._left_padded(prompts)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        eos = torch.tensor(self.eos_token_ids, device=self.device)
        record = _StepLogprobs(k) if k is not None else None

        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1]
        next_pos = mask.sum(-1)  # position id of each row's next token
        active = list(range(n))  # row index of each batch slot
        tokens: list[list[int]] = [[] for _ in range(n)]
        reasons: list[str] = ["length"] * n
        for step in range(sampling.max_new_tokens):
            u = torch.cat([torch.rand(1, generator=gens[r], dtype=torch.float64) for r in active]).to(self.device)
            nxt = self._sample(logits, u, sampling)
            if record is not None:
                record.record(logits, active, nxt)
            stopped = torch.isin(nxt, eos).tolist()
            for slot, (r, tok) in enumerate(zip(active, nxt.tolist())):
                tokens[r].append(tok)
                if stopped[slot]:
                    reasons[r] = "stop"
            keep = [slot for slot in range(len(active)) if not stopped[slot]]
            if not keep or step + 1 == sampling.max_new_tokens:
                break
            if len(keep) < len(active):
                sel = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(sel)
                mask, next_pos, nxt = mask[sel], next_pos[sel], nxt[sel]
                active = [active[slot] for slot in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            out = self.model(
                input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                past_key_values=cache, use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
        generations = [Generation(tuple(t), reasons[r]) for r, t in enumerate(tokens)]  # type: ignore[arg-type]
        return generations, record.result([len(t) for t in tokens]) if record is not None else None

    @staticmethod
    def _sample(logits: torch.Tensor, u: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
        """One token per row from fp32 logits [B, V] and one uniform per row in [0, 1).

        Temperature 0 is greedy (argmax, lowest id on ties). Otherwise temperature, then top-k, then top-p
        (keep the most likely tokens while the mass before them is < top_p), then inverse-CDF with ``u``.
        """
        logits = logits.float()
        if sampling.temperature == 0:
            return logits.argmax(dim=-1)
        x = logits / sampling.temperature
        vocab = x.shape[-1]
        if sampling.top_k != -1:
            vals, idx = torch.topk(x, min(sampling.top_k, vocab), dim=-1)
            return HFEngine._pick(torch.softmax(vals, -1), idx, u, sampling.top_p)
        probs = torch.softmax(x, dim=-1)
        if sampling.top_p >= 1.0:  # plain sampling over the vocabulary, in id order
            return HFEngine._pick(probs, None, u, 1.0)
        vals, idx = torch.topk(probs, min(_NUCLEUS_PROBE, vocab), dim=-1)
        chosen = HFEngine._pick(vals, idx, u, sampling.top_p)
        wide = (vals.sum(-1) < sampling.top_p).nonzero().flatten()
        if wide.numel():  # the nucleus is wider than the probe: sort those rows fully
            svals, sidx = torch.sort(probs[wide], dim=-1, descending=True)
            chosen[wide] = HFEngine._pick(svals, sidx, u[wide], sampling.top_p)
        return chosen

    @staticmethod
    def _pick(probs: torch.Tensor, idx: torch.Tensor | None, u: torch.Tensor, top_p: float) -> torch.Tensor:
        """Inverse-CDF draw from ``probs`` [B, C] (sorted descending when ``top_p < 1``); ``idx`` maps columns
        to token ids (None: column = id)."""
        if top_p < 1.0:
            # float64: an fp32 cumsum on CUDA rounds differently with the batch's row count, which moved the
            # nucleus edge for 1-2 rows in 64 between a sample drawn alone and the same one drawn in a batch
            wide = probs.double()
            before = wide.cumsum(-1) - wide
            probs = torch.where(before < top_p, probs, torch.zeros_like(probs))
        cdf = probs.double().cumsum(-1)
        target = (u.double() * cdf[:, -1]).unsqueeze(-1)
        col = (cdf <= target).sum(-1).clamp(max=probs.shape[-1] - 1)
        # Never land on a zero-probability column through rounding at the top end.
        # the last column with mass: first hit scanning from the end (no int64 cumsum over the vocabulary)
        last_nonzero = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.uint8).argmax(-1)
        col = torch.minimum(col, last_nonzero)
        return col if idx is None else idx.gather(1, col.unsqueeze(-1)).squeeze(-1)


def build(model: str | os.PathLike[str], options: EngineOptions, *, tokenizer: Any | None = None,
          max_batch_size: int = 64) -> HFEngine:
    """The registry's builder: one in-process model on ``options.device`` in ``options.dtype`` (the other options
    are for serving engines and do not apply). ``tokenizer``: the caller's own, else the folder's, if any."""
    return HFEngine.from_pretrained(model, options.device, options.dtype, tokenizer=tokenizer,
                                    max_batch_size=max_batch_size)
