"""Tokenizers and chat templates, loaded offline.

Why this module exists: the prewarm job, the teacher server, the trainer and the evaluator must all turn a
problem into *the same* token ids (the teacher cache is keyed by prompt ids), so they must load the same
tokenizer the same way and be able to prove it. This module loads tokenizers only from local files (the
bundled copies under ``brts/shared/data/tokenizers`` or a directory the user names), never from the network,
and gives each tokenizer a fingerprint that changes whenever the id<->token map does.

The bundled ``deepseek-r1-distill-qwen`` folder holds only a ``tokenizer_config.json`` (its tokenizer.json
could not be obtained, see DATA.md), so it cannot load as a tokenizer; :func:`load_chat_template` reads its
chat template and bos/eos strings so that the DeepSeek prompt format can be rendered through the Qwen
tokenizer, whose BPE vocabulary is the same.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

# huggingface_hub reads this when it is first imported: set it before transformers comes in, so that
# nothing in this process tries the network on our behalf. `setdefault` leaves an explicit user choice alone.
# transformers itself is imported inside the functions, so that `brts.shared.data` (which needs only
# bundled_data_dir) loads without it; every load also passes local_files_only=True.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BUNDLED_TOKENIZERS",
    "DEFAULT_TOKENIZER",
    "bundled_data_dir",
    "bundled_tokenizer_dir",
    "load_tokenizer",
    "tokenizer_fingerprint",
    "load_chat_template",
]

#: Bundled tokenizer folders. Only "qwen2.5-instruct" loads as a tokenizer; "deepseek-r1-distill-qwen" is a
#: chat template (tokenizer_config.json) only.
BUNDLED_TOKENIZERS: tuple[str, ...] = ("qwen2.5-instruct", "deepseek-r1-distill-qwen")
DEFAULT_TOKENIZER = "qwen2.5-instruct"

# Any one of these makes a folder loadable by AutoTokenizer (byte-level BPE, sentencepiece, WordPiece).
_TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")
_CONFIG_FILE = "tokenizer_config.json"


def bundled_data_dir() -> Path:
    """The folder of data files shipped inside the package (never /work/shared: the project is self-contained)."""
    return Path(__file__).parent / "data"


def bundled_tokenizer_dir(name: str = DEFAULT_TOKENIZER) -> Path:
    """The folder of bundled tokenizer ``name``; unknown names raise ValueError listing the bundled ones."""
    if name not in BUNDLED_TOKENIZERS:
        raise ValueError(f"tokenizer name {name!r} is not bundled; bundled tokenizers: {', '.join(BUNDLED_TOKENIZERS)}")
    return bundled_data_dir() / "tokenizers" / name


def _looks_like_hub_id(text: str) -> bool:
    """'org/model' (one slash, no path-like start): worth trying in the local Hugging Face cache."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _resolve_tokenizer_source(path_or_name: str | os.PathLike[str]) -> str:
    """Turn a bundled name, a directory or a hub id into the one string the cache is keyed on.

    Directories are resolved to an absolute path so "./x" and "/abs/x" share one cache entry. The folder must
    hold at least one vocabulary file: a folder with only tokenizer_config.json (like the bundled DeepSeek one)
    would otherwise load as a broken tokenizer with no vocabulary.
    """
    text = os.fspath(path_or_name)
    if not text:
        raise ValueError("tokenizer: empty path or name; give a tokenizer directory or a bundled name "
                         f"({', '.join(BUNDLED_TOKENIZERS)})")
    path = Path(text).expanduser()
    if text in BUNDLED_TOKENIZERS and not path.exists():
        path = bundled_tokenizer_dir(text)
    if path.is_dir():
        present = sorted(p.name for p in path.iterdir())
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            hint = ""
            if (path / _CONFIG_FILE).is_file():
                hint = " (a config-only folder can still provide a chat template: use load_chat_template)"
            raise ValueError(
                f"tokenizer directory {path} has no tokenizer files: expected one of {', '.join(_TOKENIZER_FILES)}, "
                f"found {present or 'nothing'}{hint}"
            )
        return str(path.resolve())
    if path.exists():
        raise ValueError(f"tokenizer path {path} is a file; give the directory that holds the tokenizer files")
    if _looks_like_hub_id(text):
        return text  # tried in the local Hugging Face cache only (local_files_only=True)
    raise ValueError(
        f"tokenizer {text!r}: no such directory, and not a bundled name ({', '.join(BUNDLED_TOKENIZERS)}) "
        "or a Hugging Face id already in the local cache"
    )


@functools.lru_cache(maxsize=16)
def _load_resolved(source: str) -> PreTrainedTokenizerBase:
    """Load once per resolved source: building the Qwen tokenizer from vocab.json + merges takes ~0.5 s."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:  # transformers reports missing/broken files as OSError or ValueError
        raise ValueError(f"tokenizer {source}: could not be loaded offline: {exc}") from exc


def load_tokenizer(path_or_name: str | os.PathLike[str] = DEFAULT_TOKENIZER) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a bundled name, a local directory, or a hub id already in the local cache.

    The result is cached per resolved path and shared by every caller, so treat it as read-only: adding
    tokens to it would change everyone's ids (and its fingerprint).
    """
    return _load_resolved(_resolve_tokenizer_source(path_or_name))


def _added_token_record(token_id: int, token: Any) -> list[Any]:
    """The parts of an added token that change how text is split or decoded, in a JSON-stable form."""
    if isinstance(token, str):  # some tokenizer classes hand back plain strings
        return [token_id, token, None, None, None, None, None]
    return [
        token_id,
        str(token.content),
        bool(getattr(token, "special", False)),
        bool(getattr(token, "lstrip", False)),
        bool(getattr(token, "rstrip", False)),
        bool(getattr(token, "normalized", False)),
        bool(getattr(token, "single_word", False)),
    ]


# tokenizer -> (cheap state check, fingerprint). The base vocabulary of a loaded tokenizer only changes through
# added tokens, which the check covers (ids, contents and flags), so a hit is exact; weak keys let tokenizers die.
_FINGERPRINTS: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], str]] = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 hex of the tokenizer's id->token map including added tokens and their flags.

    Two processes (server, trainer) compare this to prove that prompt ids mean the same thing on both
    sides. It depends only on the map, not on the class or the file layout, so it is stable across loads
    and changes when any token, id or added-token flag changes. The first call per tokenizer takes ~0.5 s
    for a 150k vocabulary; later calls reuse it while the added tokens and the length are unchanged.
    """
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ValueError(f"tokenizer: expected a transformers tokenizer, got {type(tokenizer).__name__}")
    added = [_added_token_record(int(i), t) for i, t in sorted(tokenizer.added_tokens_decoder.items())]
    state = (len(tokenizer), json.dumps(added, ensure_ascii=False))
    hit = _FINGERPRINTS.get(tokenizer)
    if hit is not None and hit[0] == state:
        return hit[1]
    items = sorted(tokenizer.get_vocab().items(), key=operator.itemgetter(1))
    digest = hashlib.sha256()
    for part in ([t for t, _ in items], [int(i) for _, i in items], added):
        digest.update(json.dumps(part, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        digest.update(b"\n")  # never inside JSON text: parts cannot run into each other
    fingerprint = digest.hexdigest()
    _FINGERPRINTS[tokenizer] = (state, fingerprint)
    return fingerprint


def _token_string(value: Any, field: str, source: Path) -> str | None:
    """bos/eos in tokenizer_config.json are a string, null, or an AddedToken dict with "content"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(
        f"{source}: field {field!r} must be a string, null or an object with a 'content' string, got {value!r}"
    )


def _chat_config_file(path_or_name: str | os.PathLike[str]) -> Path:
    """A bundled name, a tokenizer directory, or a tokenizer_config.json file -> that config file."""
    text = os.fspath(path_or_name)
    path = Path(text).expanduser()
    if text in BUNDLED_TOKENIZERS and not path.exists():
        path = bundled_tokenizer_dir(text)
    if path.is_dir():
        path = path / _CONFIG_FILE
    if not path.is_file():
        raise ValueError(
            f"chat template source {text!r}: {path} does not exist; give a bundled name "
            f"({', '.join(BUNDLED_TOKENIZERS)}), a tokenizer directory or a tokenizer_config.json file"
        )
    return path


def load_chat_template(path_or_name: str | os.PathLike[str]) -> tuple[str, dict[str, str]]:
    """Read ``chat_template`` and the bos/eos token strings from a tokenizer_config.json.

    Returns ``(template, kwargs)`` where kwargs holds "bos_token"/"eos_token" (only those that are set), ready to
    pass to ``apply_chat_template``: the DeepSeek template prints ``{{bos_token}}``, which the Qwen tokenizer
    (no bos) cannot supply itself. Unset tokens are left out rather than passed as None, because Jinja
    would print None as the text "None".
    """
    path = _chat_config_file(path_or_name)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    template = config.get("chat_template")
    if isinstance(template, list):  # newer configs may store named templates: [{"name":..., "template":...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise ValueError(f"{path}: field 'chat_template' is missing or not a non-empty string")
    kwargs: dict[str, str] = {}
    for field in ("bos_token", "eos_token"):
        value = _token_string(config.get(field), field, path)
        if value is not None:
            kwargs[field] = value
    return template, kwargs
