"""The exact teacher scorer: a torch forward of a transformers causal LM, chunked over positions.

Why this exists (issue 3, engine-apis.md §3): the student-context loss needs the teacher's log-prob at the
student's own top-K ids at every position, which no released SGLang or vLLM serves exactly. So every engine
scores with this: one forward of the transformer body per batch, then the LM head, fp32 log-softmax over the
FULL logits dimension, top-K and the gather at candidate ids, one chunk of positions at a time. A sequence of
8,192 tokens with a 151,936 vocabulary would need ~5 GB for fp32 logits and as much again for their
log-softmax; chunked at 512 positions the peak is ~0.3 GB per chunk tensor (see bench/bench_scoring_memory.py).

Numbers are always temperature 1 and normalised over the whole logits dimension (which may exceed the
tokenizer's length: the padding ids get their own, usually tiny, probability), never the sampling distribution.
The scorer assumes the model's logits are ``lm_head(last_hidden_state)`` (optionally soft-capped, as Gemma-2);
the tests compare it with ``model(input_ids).logits`` to 1e-5.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from brts.shared.engines.base import ScoreItem, ScoreOutput, check_token_ids
from brts.shared.engines.loading import load_causal_lm, logits_dim
from brts.shared.topk import PAD_ID, TopK

__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_MAX_BATCH_TOKENS", "TorchScorer"]

#: Positions per LM-head chunk: 512 × 151,936 fp32 = 311 MB per chunk tensor.
DEFAULT_CHUNK_SIZE = 512
#: Padded tokens (batch × longest) per body forward; one longer sequence still goes alone.
DEFAULT_MAX_BATCH_TOKENS = 8192


class TorchScorer:
    """Exact T=1 full-vocabulary teacher log-probs (the ``Scorer`` protocol) from a loaded transformers model.

    ``chunk_size`` bounds the positions whose logits exist at once; ``max_batch_tokens`` bounds the padded
    tokens of one body forward (several short items share one right-padded forward). The model is shared,
    never copied: the hf engine hands its own model here.
    """

    def __init__(
        self,
        model: Any,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_context: int | None = None,
    ) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size: must be an integer >= 1, got {chunk_size!r}")
        if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens: must be an integer >= 1, got {max_batch_tokens!r}")
        self.model = model.eval()  # scoring must be deterministic: no dropout
        self.vocab_size = logits_dim(model)
        ctx = max_context if max_context is not None else getattr(model.config, "max_position_embeddings", None)
        if not isinstance(ctx, int) or ctx < 2:
            raise ValueError(
                f"max_context: must be an integer >= 2 (or come from config.max_position_embeddings), got {ctx!r}"
            )
        self.max_context = ctx
        self.chunk_size = chunk_size
        self.max_batch_tokens = max_batch_tokens
        self.device = next(model.parameters()).device
        self._body = model.base_model
        self._head = model.get_output_embeddings()
        self._softcap = getattr(model.config, "final_logit_softcapping", None)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        **kwargs: Any,
    ) -> "TorchScorer":
        """Load a checkpoint folder and wrap it; ``kwargs`` go to the constructor (chunk_size, ...)."""
        return cls(load_causal_lm(path, device, dtype), **kwargs)

    # ------------------------------------------------------------------ validation

    def _validate(self, items: Sequence[ScoreItem], k: int) -> list[np.ndarray | None]:
        """Check every item before any compute; return the candidate arrays as int64 (or None)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= self.vocab_size:
            raise ValueError(f"k: must be an integer in 1..{self.vocab_size} (the vocabulary), got {k!r}")
        candidates: list[np.ndarray | None] = []
        for i, item in enumerate(items):
            if not isinstance(item, ScoreItem):
                raise ValueError(f"items[{i}]: expected a ScoreItem, got {type(item).__name__}")
            ids = item.token_ids
            check_token_ids(ids, self.vocab_size, self.max_context, f"items[{i}].token_ids")
            rs = item.response_start
            if isinstance(rs, bool) or not isinstance(rs, (int, np.integer)) or not 1 <= int(rs) < len(ids):
                raise ValueError(
                    f"items[{i}].response_start: must be in 1..{len(ids) - 1} so that the response is non-empty "
                    f"and has a preceding token, got {rs!r} for {len(ids)} tokens"
                )
            rows = len(ids) - int(rs)
            cand = item.candidate_ids
            if cand is None:
                candidates.append(None)
                continue
            if not isinstance(cand, np.ndarray) or cand.dtype.kind not in "iu":
                kind = cand.dtype if isinstance(cand, np.ndarray) else type(cand).__name__
                raise ValueError(f"items[{i}].candidate_ids: must be an integer numpy array, got {kind}")
            if cand.ndim != 2 or cand.shape[0] != rows:
                raise ValueError(
                    f"items[{i}].candidate_ids: shape must be [{rows}, K'] (one row per response token), "
                    f"got {list(cand.shape)}"
                )
            cand = cand.astype(np.int64, copy=False)
            bad = np.argwhere((cand < PAD_ID) | (cand >= self.vocab_size))
            if bad.size:
                r, c = (int(x) for x in bad[0])
                raise ValueError(
                    f"items[{i}].candidate_ids: id {int(cand[r, c])} at [{r}, {c}] is outside 0..{self.vocab_size - 1} "
                    "(use -1 for no candidate)"
                )
            candidates.append(cand)
        return candidates

    # ------------------------------------------------------------------ compute

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Group item indices (longest first, so padding stays small) under the padded-token budget."""
        order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
        batches: list[list[int]] = []
        for j in order:
            if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= self.max_batch_tokens:
                batches[-1].append(j)
            else:
                batches.append([j])
        return batches

    def _hidden(self, seqs: list[Sequence[int]]) -> torch.Tensor:
        """Last hidden states [B, L, H] of one right-padded body forward (no logits yet)."""
        longest = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), longest), dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[b, : len(s)] = 1
        # Equal lengths need no mask: the causal-only path never builds an [L, L] mask.
        attn = None if all(len(s) == longest for s in seqs) else mask.to(self.device)
        out = self._body(input_ids=ids.to(self.device), attention_mask=attn, use_cache=False)
        return out.last_hidden_state

    def _score_rows(
        self, hidden: torch.Tensor, k: int, cand: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Top-k ids/log-probs and candidate log-probs for hidden rows [R, H], ``chunk_size`` rows at a time."""
        ids_out, lps_out, cand_out = [], [], []
        for start in range(0, hidden.shape[0], self.chunk_size):
            logits = self._head(hidden[start : start + self.chunk_size]).float()
            if self._softcap:
                logits = torch.tanh(logits / self._softcap) * self._softcap
            logp = torch.log_softmax(logits, dim=-1)
            del logits
            top_lp, top_ids = torch.topk(logp, k, dim=-1, sorted=True)
            lps_out.append(top_lp)
            ids_out.append(top_ids)
            if cand is not None:
                c = cand[start : start + self.chunk_size]
                got = torch.gather(logp, 1, c.clamp(min=0))
                cand_out.append(torch.where(c >= 0, got, torch.full_like(got, float("-inf"))))
            del logp
        return (
            torch.cat(ids_out),
            torch.cat(lps_out),
            torch.cat(cand_out) if cand is not None else None,
        )

    @torch.inference_mode()
    def score(self, items: Sequence[ScoreItem], k: int) -> list[ScoreOutput]:
        """Per item: row t (predicting ``token_ids[response_start + t]``) holds the top-``k`` ids and fp32
        log-probs, sorted descending (-1/-inf where a log-prob is -inf), and the log-probs at the given
        candidate ids (-inf for -1). All items are validated before anything runs."""
        candidates = self._validate(items, k)
        k = int(k)
        results: list[ScoreOutput | None] = [None] * len(items)
        lengths = [len(it.token_ids) for it in items]
        for batch in self._batches(lengths):
            hidden = self._hidden([items[j].token_ids for j in batch])
            spans = [(int(items[j].response_start) - 1, lengths[j] - 1) for j in batch]
            rows = torch.cat([hidden[b, lo:hi] for b, (lo, hi) in enumerate(spans)])
            del hidden
            cand_t = None
            if any(candidates[j] is not None for j in batch):
                width = max((candidates[j].shape[1] for j in batch if candidates[j] is not None), default=0)
                cand_np = np.full((rows.shape[0], width), PAD_ID, dtype=np.int64)
                at = 0
                for j, (lo, hi) in zip(batch, spans):
                    c = candidates[j]
                    if c is not None:
                        cand_np[at : at + hi - lo, : c.shape[1]] = c
                    at += hi - lo
                cand_t = torch.from_numpy(cand_np).to(self.device)
            top_ids, top_lps, cand_lps = self._score_rows(rows, k, cand_t)
            top_ids_np = top_ids.to(torch.int32).cpu().numpy()
            top_lps_np = top_lps.cpu().numpy().astype(np.float32, copy=False)
            cand_np_out = cand_lps.cpu().numpy().astype(np.float32, copy=False) if cand_lps is not None else None
            at = 0
            for j, (lo, hi) in zip(batch, spans):
                n = hi - lo
                ids_j = top_ids_np[at : at + n].copy()
                lps_j = np.minimum(top_lps_np[at : at + n], 0.0)  # log-softmax of the max is <= 0; guard rounding
                ids_j[np.isneginf(lps_j)] = PAD_ID
                cand_j = None
                if candidates[j] is not None:
                    cand_j = np.ascontiguousarray(cand_np_out[at : at + n, : candidates[j].shape[1]])
                results[j] = ScoreOutput(topk=TopK(ids_j, np.ascontiguousarray(lps_j)), candidate_logprobs=cand_j)
                at += n
        return [r for r in results if r is not None]
