"""Shared by the cache subprocess scripts and ``test_cache_processes.py``: a fast tokenizer, the prompts, a digest.

Why a "light" tokenizer: importing ``transformers`` pulls in torch (5-10 s per process), and the kill test starts
a writer a dozen times. The test serializes the real Qwen tokenizer's backend (``backend_tokenizer.to_str()``,
the very ``tokenizers.Tokenizer`` the HF object delegates to) into a file; this adapter loads it with the
``tokenizers`` library alone and offers the three calls the doubles and the pipeline use. Same backend, same ids:
and the test re-requests the writer's prompts with ids from the real tokenizer, so any difference would show up
as missing entries.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/server: cache_doubles

from cache_doubles import job  # noqa: E402 - after the sys.path line that makes the sibling helper modules importable

TEACHER = "teacher-proc"
N_TIER1 = 4
SEED = 0
K = 8


class LightTokenizer:
    """encode / decode / convert_tokens_to_ids over a serialized ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer_json: str | Path) -> None:
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._tok.token_to_id(token)


def load(tokenizer_json: str | None) -> Any:
    if tokenizer_json:
        return LightTokenizer(tokenizer_json)
    from brts.shared.tokenizer import bundled_tokenizer_dir, load_tokenizer

    return load_tokenizer(bundled_tokenizer_dir())


def sampling() -> Any:
    from brts.shared.engines.base import SamplingParams

    return SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=32)


def prompt_job(tokenizer: Any, n: int) -> Any:
    """Prompt number n: "PROBLEM: (100+n)+1", a new pool per n (a != 99, so never a Tier-2 retry)."""
    return job(tokenizer, 100 + n, 1, n_tier1=N_TIER1)


def digest(served: Sequence[Any]) -> str:
    """Everything a reply carries from the stored bytes, hashed: equal digests mean byte-identical replies."""
    h = hashlib.blake2b(digest_size=16)
    for p in served:
        h.update(p.prompt_id.encode() + b"\x00")
        for c in p.candidates:
            h.update(repr((c.tier, c.index, c.answer, c.correct, c.leaked, c.finish_reason)).encode())
            h.update(c.token_ids.tobytes())
            if c.topk is not None:
                h.update(c.topk.ids.tobytes())
                h.update(c.topk.logprobs.tobytes())
    return h.hexdigest()
