"""PromptSpec: the one way a problem becomes prompt token ids.

Why: the teacher cache is keyed by prompt token ids, so prewarm, the trainer, the server and the evaluator
must build byte-identical ids for the same problem. Everything that decides those ids (tokenizer, chat
template, instruction suffix and its separator, system prompt, template variables such as ``bos_token``)
lives in one object, and :meth:`PromptSpec.fingerprint` hashes all of it so that two processes can check
they agree before trusting each other's cache entries.

The prompt is the problem followed by an instruction suffix in a single user message, then the template's
generation prompt (``add_generation_prompt=True``), tokenized with ``add_special_tokens=False`` so the
template alone decides where BOS and role markers go (the reference code re-tokenizes the same way,
brts-reference §4.2).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brts.shared.tokenizer import (
    BUNDLED_TOKENIZERS,
    DEFAULT_TOKENIZER,
    load_chat_template,
    load_tokenizer,
    tokenizer_fingerprint,
)

if TYPE_CHECKING:  # transformers is imported when a spec is built, so importing the constants stays cheap
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_INSTRUCTION_SUFFIX",
    "DEFAULT_MAX_PROMPT_LEN",
    "PromptSpec",
    "PromptTooLongError",
]

#: The suffix of the authors' offline eval scripts and of the DeepSeek-R1 model card (brts-reference §13).
DEFAULT_INSTRUCTION_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
#: The reference run's max prompt length (brts-reference §12).
DEFAULT_MAX_PROMPT_LEN = 1024

# Bump when the way a prompt is built changes, so old fingerprints stop matching.
_PROMPT_FORMAT_VERSION = 1


class PromptTooLongError(ValueError):
    """A templated prompt has more tokens than ``max_prompt_len``; carries both numbers."""

    def __init__(self, length: int, limit: int, index: int | None = None) -> None:
        self.length = length
        self.limit = limit
        self.index = index
        where = "" if index is None else f"problem index {index}: "
        super().__init__(f"{where}prompt has {length} tokens, more than max_prompt_len={limit}")


@dataclass(frozen=True, eq=False)
class PromptSpec:
    """Everything that turns a problem string into prompt token ids.

    ``chat_template=None`` uses the tokenizer's own template. ``system_prompt=None`` passes no system message,
    so the template's default applies (Qwen2.5 then adds "You are Qwen, created by Alibaba Cloud..."; an
    empty string is a real, empty system message). ``template_kwargs`` are extra variables for the template,
    e.g. ``bos_token`` for the DeepSeek-R1 template rendered through the Qwen tokenizer.
    """

    tokenizer: PreTrainedTokenizerBase
    chat_template: str | None = None
    instruction_suffix: str = DEFAULT_INSTRUCTION_SUFFIX
    suffix_separator: str = " "
    system_prompt: str | None = None
    max_prompt_len: int = DEFAULT_MAX_PROMPT_LEN
    template_kwargs: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from transformers import PreTrainedTokenizerBase

        if not isinstance(self.tokenizer, PreTrainedTokenizerBase):
            raise ValueError(
                f"tokenizer: expected a loaded transformers tokenizer, got {type(self.tokenizer).__name__}"
            )
        if self.chat_template is not None and (not isinstance(self.chat_template, str) or not self.chat_template):
            raise ValueError("chat_template: must be None (the tokenizer's own) or a non-empty Jinja template string")
        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat_template: None asks for the tokenizer's own template, but this tokenizer has none")
        for name in ("instruction_suffix", "suffix_separator"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: must be a string, got {type(getattr(self, name)).__name__}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"system_prompt: must be None or a string, got {type(self.system_prompt).__name__}")
        if isinstance(self.max_prompt_len, bool) or not isinstance(self.max_prompt_len, int) or self.max_prompt_len < 1:
            raise ValueError(f"max_prompt_len: must be an integer >= 1, got {self.max_prompt_len!r}")
        if not isinstance(self.template_kwargs, Mapping):
            raise ValueError(
                f"template_kwargs: must be a mapping of str to str, got {type(self.template_kwargs).__name__}"
            )
        reserved = {"messages", "add_generation_prompt", "tools", "documents"}
        for key, value in self.template_kwargs.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"template_kwargs: keys and values must be strings, got {key!r}: {value!r}")
            if key in reserved:
                raise ValueError(
                    f"template_kwargs: {key!r} is set by PromptSpec itself; "
                    "allowed are template variables such as bos_token"
                )
        # A private copy, so that mutating the caller's dict cannot change ids behind the fingerprint's back.
        object.__setattr__(self, "template_kwargs", dict(self.template_kwargs))
        object.__setattr__(self, "_fingerprint", None)

    @classmethod
    def from_options(
        cls,
        tokenizer: str | os.PathLike[str] | PreTrainedTokenizerBase = DEFAULT_TOKENIZER,
        chat_template: str | os.PathLike[str] | None = None,
        instruction_suffix: str = DEFAULT_INSTRUCTION_SUFFIX,
        max_prompt_len: int = DEFAULT_MAX_PROMPT_LEN,
        system_prompt: str | None = None,
        suffix_separator: str = " ",
    ) -> PromptSpec:
        """Build a spec from config-file style options.

        ``tokenizer``: a bundled name, a directory, or an already loaded tokenizer. ``chat_template``: None (the
        tokenizer's own), a bundled name ("qwen2.5-instruct", "deepseek-r1-distill-qwen"), a path to a
        tokenizer_config.json or its directory (bos/eos come along as template variables), or a literal Jinja
        template (recognised by "{%" or "{{").
        """
        from transformers import PreTrainedTokenizerBase

        tok = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else load_tokenizer(tokenizer)
        template, kwargs = _resolve_chat_template(chat_template)
        return cls(
            tokenizer=tok,
            chat_template=template,
            instruction_suffix=instruction_suffix,
            suffix_separator=suffix_separator,
            system_prompt=system_prompt,
            max_prompt_len=max_prompt_len,
            template_kwargs=kwargs,
        )

    @property
    def template(self) -> str:
        """The template actually used: the explicit one, else the tokenizer's own."""
        return self.chat_template if self.chat_template is not None else str(self.tokenizer.chat_template)

    def user_message(self, problem: str) -> str:
        """The user turn: problem, separator, suffix (no separator when the suffix is empty)."""
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"problem: must be a non-empty string, got {problem!r:.80}")
        if not self.instruction_suffix:
            return problem
        return f"{problem}{self.suffix_separator}{self.instruction_suffix}"

    def messages(self, problem: str) -> list[dict[str, str]]:
        """The chat messages handed to the template."""
        msgs = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        msgs.append({"role": "user", "content": self.user_message(problem)})
        return msgs

    def render(self, problem: str) -> str:
        """The templated prompt text, ending with the generation prompt (e.g. ``<|im_start|>assistant\\n``)."""
        text = self.tokenizer.apply_chat_template(
            self.messages(problem),
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=True,
            **self.template_kwargs,
        )
        if not isinstance(text, str):  # defensive: tokenize=False must give text
            raise ValueError(f"chat_template: rendering gave {type(text).__name__}, expected text")
        return text

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Batch tokenization without special tokens: the template already placed them as text."""
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def encode(self, problem: str) -> list[int]:
        """Prompt token ids for one problem; raises PromptTooLongError above ``max_prompt_len``."""
        ids = self._tokenize([self.render(problem)])[0]
        if len(ids) > self.max_prompt_len:
            raise PromptTooLongError(len(ids), self.max_prompt_len)
        return ids

    def encode_batch(self, problems: Sequence[str], check_length: bool = True) -> list[list[int]]:
        """Prompt ids for many problems in one tokenizer call (several times faster than a loop).

        With ``check_length`` a too-long prompt raises PromptTooLongError naming its index; without it, the
        caller gets every prompt and decides (see ``brts.shared.data.filter_by_prompt_length``).
        """
        ids = self._tokenize([self.render(p) for p in problems])
        if check_length:
            for index, row in enumerate(ids):
                if len(row) > self.max_prompt_len:
                    raise PromptTooLongError(len(row), self.max_prompt_len, index=index)
        return ids

    def fingerprint(self) -> str:
        """sha256 hex over everything that decides the ids, including the tokenizer's own fingerprint.

        Computed once per spec (the tokenizer part takes ~0.5 s) and then kept; the spec is frozen.
        """
        cached: str | None = object.__getattribute__(self, "_fingerprint")
        if cached is None:
            payload: dict[str, Any] = {
                "version": _PROMPT_FORMAT_VERSION,
                "template": self.template,
                "instruction_suffix": self.instruction_suffix,
                "suffix_separator": self.suffix_separator,
                "system_prompt": self.system_prompt,
                "max_prompt_len": self.max_prompt_len,
                "template_kwargs": sorted(self.template_kwargs.items()),
                "tokenizer": tokenizer_fingerprint(self.tokenizer),
            }
            blob = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
            cached = hashlib.sha256(blob.encode("utf-8")).hexdigest()
            object.__setattr__(self, "_fingerprint", cached)
        return cached

    def __repr__(self) -> str:
        tok = getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)
        return (
            f"PromptSpec(tokenizer={tok!r}, chat_template={'<own>' if self.chat_template is None else '<custom>'}, "
            f"instruction_suffix={self.instruction_suffix!r}, suffix_separator={self.suffix_separator!r}, "
            f"system_prompt={self.system_prompt!r}, max_prompt_len={self.max_prompt_len}, "
            f"template_kwargs={self.template_kwargs!r})"
        )


def _resolve_chat_template(spec: str | os.PathLike[str] | None) -> tuple[str | None, dict[str, str]]:
    """Map the ``chat_template`` option to (template text or None, template variables)."""
    if spec is None:
        return None, {}
    if isinstance(spec, str) and ("{%" in spec or "{{" in spec):
        return spec, {}
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text in BUNDLED_TOKENIZERS or Path(text).expanduser().exists():
            return load_chat_template(text)
        raise ValueError(
            f"chat_template: {text!r} is not a bundled name ({', '.join(BUNDLED_TOKENIZERS)}), an existing "
            "tokenizer_config.json or tokenizer directory, or a Jinja template (containing '{%' or '{{')"
        )
    raise ValueError(f"chat_template: expected None, a name, a path or a template string, got {type(spec).__name__}")
