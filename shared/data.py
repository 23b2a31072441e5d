"""Math problem sets: the bundled DAPO-Math-17k training pool, the bundled AIME/AMC eval sets, and any
JSONL/parquet file with a problem and an answer column.

Why one loader module: every part of the system (prewarm, trainer, evaluator) must see the same problem
text and the same ground-truth string for a given row, because the prompt ids built from the text key the
teacher cache and the answer string is what correctness is judged against. So the known defects of the
bundled files are repaired here, once, and nowhere else (see DATA.md):

- DAPO prompts carry an instruction wrapper ("Solve the following math problem step by step ... Answer:");
  it is stripped exactly, and a row whose wrapper differs is an error rather than a silent mis-strip.
- DAPO ground truths can exceed int64 (up to ~2.2e22): answers stay the exact strings, never numbers.
- aime25 has form feeds where ``\\f`` of ``\\frac`` was decoded as an escape: repaired to ``\\f``.
- amc23 answers are floats (27.0): integral values become "27".

Loading never touches /work/shared or the network: the bundled files live in ``brts/shared/data``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from brts.shared.tokenizer import bundled_data_dir

if TYPE_CHECKING:  # imported lazily at run time: loading data must not require transformers
    from brts.shared.prompts import PromptSpec

__all__ = [
    "DAPO_PREFIX",
    "DAPO_SUFFIX",
    "DAPO_NAMES",
    "EVAL_SETS",
    "DataFormatError",
    "DedupeReport",
    "Problem",
    "dapo_path",
    "dedupe_problems",
    "filter_by_prompt_length",
    "load_dapo",
    "load_dataset",
    "load_eval",
    "load_problems",
    "with_routes",
]

#: The fixed DAPO instruction wrapper, verified against every bundled row (the prefix ends at the first blank line).
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
DAPO_SOURCE = "dapo-math-17k"
#: Names that ``load_dataset`` maps to the bundled DAPO parquet.
DAPO_NAMES: tuple[str, ...] = ("dapo", DAPO_SOURCE)

#: Bundled evaluation sets and their sizes. The AMC set is AMC 2023 (40 problems); the paper's had 83.
EVAL_SETS: MappingProxyType[str, int] = MappingProxyType({"aime24": 30, "aime25": 30, "amc23": 40})

PROBLEM_FIELDS: tuple[str, ...] = ("problem", "question", "prompt")
ANSWER_FIELDS: tuple[str, ...] = ("answer", "ground_truth", "final_answer", "reward_model.ground_truth")
ID_FIELDS: tuple[str, ...] = ("id", "extra_info.index")
_SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet"}


class DataFormatError(ValueError):
    """A data file or row does not have the shape a loader accepts; the message names file, row and field."""


@dataclass(frozen=True)
class Problem:
    """One math problem: the bare problem text (no instruction), its ground-truth answer string, an id unique
    within its source, the source name (file stem or set name) and, when asked for, its route (which teacher)."""

    id: str
    problem: str
    answer: str
    source: str
    route: str | None = None  # the value of the training config's teacher_route column: names the prompt's teacher

    def __post_init__(self) -> None:
        for name in ("id", "problem", "answer", "source"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"Problem.{name}: must be a string, got {type(getattr(self, name)).__name__}")
        if not self.problem.strip():
            raise ValueError(f"Problem.problem: empty problem text (id {self.id!r})")
        if not self.answer.strip():
            raise ValueError(f"Problem.answer: empty answer (id {self.id!r})")


@dataclass(frozen=True)
class DedupeReport:
    """What ``dedupe_problems`` kept. ``conflicting`` holds problem texts seen with two or more different
    answers: all their rows are kept (we cannot tell which answer is right), and callers should say so."""

    kept: list[Problem]
    removed: int
    conflicting: list[str]


# --------------------------------------------------------------------------------------------- helpers


def _answer_to_str(value: Any, where: str) -> str:
    """Ground truth as an exact string: ints via str (no int64 limit), integral floats without ".0".

    Floats are accepted because amc23 stores 27.0; a non-integral float keeps its repr so no digits are lost.
    """
    if value is None or isinstance(value, bool):
        raise DataFormatError(f"{where}: answer is missing or not a string/number (got {value!r})")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataFormatError(f"{where}: answer must be a finite number, got {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        if not value.strip():
            raise DataFormatError(f"{where}: answer is empty")
        return value
    raise DataFormatError(f"{where}: answer must be a string or a number, got {type(value).__name__}")


def _id_to_str(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise DataFormatError(f"{where}: id must be a non-empty string or an integer, got {value!r}")
    return str(value)


def _get(row: dict[str, Any], dotted: str) -> Any:
    """``row["a"]["b"]`` for "a.b" (verl keeps the answer under reward_model.ground_truth); None when absent."""
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _has(row: dict[str, Any], dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    if head not in row:
        return False
    return not rest or (isinstance(row[head], dict) and _has(row[head], rest))


def _file_kind(path: Path) -> str:
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataFormatError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; allowed: .jsonl, .parquet")
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    return kind


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file; blank lines are skipped, a bad line is an error naming its number."""
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_parquet(path: Path, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq  # imported here: only parquet users pay for pyarrow

    try:
        table = pq.read_table(path, columns=list(columns) if columns else None)
    except Exception as exc:  # pyarrow raises several types (ArrowInvalid, KeyError, OSError) for bad files
        raise DataFormatError(f"{path}: cannot read as parquet: {exc}") from exc
    return table.to_pylist()


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = _read_parquet(path) if _file_kind(path) == "parquet" else _read_jsonl(path)
    if not rows:
        raise DataFormatError(f"{path}: contains no rows")
    return rows


def _check_unique_ids(problems: Sequence[Problem], path: Path, field: str) -> None:
    seen: dict[str, int] = {}
    for index, p in enumerate(problems):
        if p.id in seen:
            raise DataFormatError(
                f"{path}: id {p.id!r} (field {field!r}) repeats in rows {seen[p.id]} and {index}; ids must be unique"
            )
        seen[p.id] = index


def _unwrap_dapo(text: str) -> str | None:
    """The bare problem if ``text`` carries the exact DAPO wrapper, else None."""
    if text.startswith(DAPO_PREFIX) and text.endswith(DAPO_SUFFIX) and len(text) > len(DAPO_PREFIX) + len(DAPO_SUFFIX):
        return text[len(DAPO_PREFIX) : -len(DAPO_SUFFIX)]
    return None


def _user_content(chat: Any, where: str) -> str:
    """The text of the single user message of a verl-style ``prompt`` chat list."""
    if not isinstance(chat, list):
        raise DataFormatError(
            f"{where}: 'prompt' must be a string or a list of chat messages, got {type(chat).__name__}"
        )
    users = [m for m in chat if isinstance(m, dict) and m.get("role") == "user"]
    if len(users) != 1 or not isinstance(users[0].get("content"), str):
        raise DataFormatError(
            f"{where}: 'prompt' chat list must hold exactly one user message with string content, found {len(users)}"
        )
    return users[0]["content"]


# ------------------------------------------------------------------------------------------------ DAPO


def dapo_path() -> Path:
    """The bundled DAPO-Math-17k parquet (17,917 rows)."""
    return bundled_data_dir() / "train" / "dapo-math-17k.parquet"


def repair_dapo_text(text: str) -> str:
    """Undo the one safe-to-repair upstream defect: ``\\frac`` decoded as form feed + "rac" (606 problems).

    Other stray form feeds in DAPO are PDF ligatures ("\\x0cfive" for "five") whose original letters cannot be
    recovered with certainty; they stay as upstream has them (DATA.md).
    """
    return text.replace("\x0crac", "\\frac")


def load_dapo(path: str | os.PathLike[str] | None = None, dedupe: bool = False) -> list[Problem]:
    """DAPO-Math-17k as bare problems: id = extra_info.index, answer = reward_model.ground_truth verbatim.

    The wrapper is checked on every row, because a row with a different wrapper would otherwise keep
    instruction text inside the "problem" and silently change its prompt ids. ``dedupe=True`` drops repeated
    (problem, answer) pairs and warns about problem texts that carry conflicting answers (all kept).
    """
    file = Path(path) if path is not None else dapo_path()
    if _file_kind(file) != "parquet":
        raise DataFormatError(f"{file}: DAPO data must be a .parquet file")
    rows = _read_parquet(file, columns=("prompt", "reward_model", "extra_info"))
    if not rows:
        raise DataFormatError(f"{file}: contains no rows")
    problems: list[Problem] = []
    for index, row in enumerate(rows):
        where = f"{file}: row {index}"
        chat = row["prompt"]
        if not isinstance(chat, list) or len(chat) != 1 or chat[0].get("role") != "user":
            raise DataFormatError(f"{where}: 'prompt' must be a list with exactly one user message")
        text = _unwrap_dapo(chat[0].get("content") or "")
        if text is None:
            raise DataFormatError(
                f"{where}: prompt does not carry the DAPO wrapper (expected the fixed prefix {DAPO_PREFIX[:40]!r}... "
                f"and suffix {DAPO_SUFFIX!r}); use load_problems for other formats"
            )
        answer = _get(row, "reward_model.ground_truth")
        if not isinstance(answer, str):
            raise DataFormatError(f"{where}: reward_model.ground_truth must be a string, got {answer!r}")
        problems.append(
            Problem(
                id=_id_to_str(_get(row, "extra_info.index"), f"{where}: extra_info.index"),
                problem=repair_dapo_text(text),
                answer=_answer_to_str(answer, f"{where}: reward_model.ground_truth"),
                source=DAPO_SOURCE,
            )
        )
    _check_unique_ids(problems, file, "extra_info.index")
    if not dedupe:
        return problems
    report = dedupe_problems(problems)
    if report.conflicting:
        warnings.warn(
            f"{file.name}: dedupe removed {report.removed} repeated (problem, answer) rows and kept all rows of "
            f"{len(report.conflicting)} problem texts that appear with different answers",
            UserWarning,
            stacklevel=2,
        )
    return report.kept


def dedupe_problems(problems: Iterable[Problem]) -> DedupeReport:
    """Keep the first row of each exact (problem text, answer) pair.

    A text seen with two different answers keeps one row per answer: choosing one would be a guess, and
    the reward for that prompt is only as good as its ground truth, so the conflict is reported instead.
    """
    kept: list[Problem] = []
    seen_pairs: set[tuple[str, str]] = set()
    answers: dict[str, set[str]] = {}
    removed = 0
    for p in problems:
        key = (p.problem, p.answer)
        if key in seen_pairs:
            removed += 1
            continue
        seen_pairs.add(key)
        answers.setdefault(p.problem, set()).add(p.answer)
        kept.append(p)
    conflicting = [text for text, found in answers.items() if len(found) > 1]  # dict order = first seen
    return DedupeReport(kept=kept, removed=removed, conflicting=conflicting)


# ------------------------------------------------------------------------------------------------ eval


def load_eval(name: str) -> list[Problem]:
    """A bundled evaluation set by name (see EVAL_SETS); ids are the file's own ids as strings.

    aime24 answers stay as given ("025": compare as integers downstream), aime25 int answers become strings,
    amc23 float answers lose their ".0". Form feeds are turned back into ``\\f`` (aime25 problems 18 and 27
    lost the f of ``\\frac`` to a JSON escape).
    """
    if name not in EVAL_SETS:
        raise ValueError(f"eval set {name!r} is unknown; allowed: {', '.join(EVAL_SETS)}")
    file = bundled_data_dir() / "eval" / f"{name}.jsonl"
    rows = _read_rows(file)
    problems: list[Problem] = []
    for index, row in enumerate(rows):
        where = f"{file}: row {index}"
        text = row.get("problem")
        if not isinstance(text, str):
            raise DataFormatError(f"{where}: field 'problem' must be a string")
        problems.append(
            Problem(
                id=_id_to_str(row.get("id"), f"{where}: id"),
                problem=text.replace("\x0c", "\\f"),
                answer=_answer_to_str(row.get("answer"), where),
                source=name,
            )
        )
    if len(problems) != EVAL_SETS[name]:
        raise DataFormatError(f"{file}: expected {EVAL_SETS[name]} problems, found {len(problems)}")
    _check_unique_ids(problems, file, "id")
    return problems


# --------------------------------------------------------------------------------------------- generic


def _detect(columns: Sequence[str], sample: dict[str, Any], accepted: Sequence[str], what: str, path: Path) -> str:
    for name in accepted:
        if _has(sample, name):
            return name
    raise DataFormatError(
        f"{path}: no {what} column found; columns: {', '.join(columns)}; accepted: {', '.join(accepted)} "
        f"(or name one with {what}_field=...)"
    )


def load_problems(
    path: str | os.PathLike[str],
    problem_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    source: str | None = None,
) -> list[Problem]:
    """Problems from any .jsonl or .parquet file with a problem and an answer column.

    Columns are auto-detected (PROBLEM_FIELDS, ANSWER_FIELDS, ID_FIELDS, first match wins) unless named;
    dotted names reach into nested objects ("reward_model.ground_truth"). A verl-style ``prompt`` chat list
    gives its single user message, with the DAPO wrapper stripped when it carries it exactly. Ids default
    to an "id" / "extra_info.index" column, else the row index; the source defaults to the file stem.
    """
    file = Path(path)
    rows = _read_rows(file)
    columns = list(rows[0].keys())
    sample = rows[0]
    pfield = problem_field or _detect(columns, sample, PROBLEM_FIELDS, "problem", file)
    afield = answer_field or _detect(columns, sample, ANSWER_FIELDS, "answer", file)
    ifield = id_field or next((f for f in ID_FIELDS if _has(sample, f)), None)
    for given, what in ((problem_field, "problem"), (answer_field, "answer"), (id_field, "id")):
        if given is not None and not _has(sample, given):
            raise DataFormatError(f"{file}: {what}_field {given!r} not found; columns: {', '.join(columns)}")
    src = source if source is not None else file.stem
    problems: list[Problem] = []
    for index, row in enumerate(rows):
        where = f"{file}: row {index}"
        raw = _get(row, pfield)
        if isinstance(raw, str):
            text = _unwrap_dapo(raw) or raw
        elif raw is None:
            raise DataFormatError(f"{where}: field {pfield!r} is missing")
        else:
            content = _user_content(raw, where)
            text = _unwrap_dapo(content) or content
        if not text.strip():
            raise DataFormatError(f"{where}: field {pfield!r} is empty")
        pid = str(index) if ifield is None else _id_to_str(_get(row, ifield), f"{where}: field {ifield!r}")
        problems.append(Problem(id=pid, problem=text,
                                answer=_answer_to_str(_get(row, afield), f"{where}: field {afield!r}"), source=src))
    _check_unique_ids(problems, file, ifield or "(row index)")
    return problems


def _route_value(value: Any, where: str) -> str | None:
    """A route cell as a teacher name: strings as given, integers as text, empty or missing as no route."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(f"{where}: a route must be a string naming a teacher, got {value!r}")
    return str(value)


def with_routes(problems: list[Problem], path: Path, route_field: str) -> list[Problem]:
    """``problems`` (one per row of ``path``, in row order) with ``route`` read from the column ``route_field``."""
    head = route_field.split(".")[0]
    if _file_kind(path) == "parquet":
        import pyarrow.parquet as pq

        columns = list(pq.read_schema(path).names)
        rows = _read_parquet(path, columns=(head,)) if head in columns else []
    else:
        rows = _read_rows(path)
        columns = list(rows[0].keys()) if rows else []
    if head not in columns:
        raise DataFormatError(f"{path}: teacher_route column {route_field!r} not found; columns: {', '.join(columns)}")
    if len(rows) != len(problems):
        raise DataFormatError(f"{path}: {len(rows)} rows but {len(problems)} problems; routes need one problem per row")
    return [replace(p, route=_route_value(_get(row, route_field), f"{path}: row {i}: field {route_field!r}"))
            for i, (p, row) in enumerate(zip(problems, rows))]


def load_dataset(spec: str | os.PathLike[str], route_field: str | None = None) -> list[Problem]:
    """One entry point for command lines: "dapo"/"dapo-math-17k", an eval set name, or a file path; with
    ``route_field``, each problem's ``route`` is read from that column (rows without it have none)."""
    text = os.fspath(spec)
    if text in DAPO_NAMES:
        problems, path = load_dapo(), dapo_path()
    elif text in EVAL_SETS:
        problems, path = load_eval(text), bundled_data_dir() / "eval" / f"{text}.jsonl"
    elif Path(text).expanduser().exists() or Path(text).suffix.lower() in _SUFFIXES:
        path = Path(text).expanduser()
        problems = load_problems(path)
    else:
        path = None
    if path is not None:
        return problems if route_field is None else with_routes(problems, path, route_field)
    raise ValueError(
        f"dataset {text!r}: not a bundled name ({', '.join((*DAPO_NAMES, *EVAL_SETS))}) and no such file "
        "(.jsonl or .parquet)"
    )


def filter_by_prompt_length(
    problems: Sequence[Problem], prompt_spec: PromptSpec, max_len: int | None = None
) -> tuple[list[Problem], list[Problem]]:
    """Split problems into (kept, dropped) by templated prompt length, like verl's filter_overlong_prompts.

    ``max_len`` defaults to the spec's max_prompt_len. Dropping up front (rather than failing mid-run) is what
    the reference does; callers should log how many were dropped.
    """
    limit = prompt_spec.max_prompt_len if max_len is None else max_len
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_len: must be None or an integer >= 1, got {max_len!r}")
    kept: list[Problem] = []
    dropped: list[Problem] = []
    chunk = 1024  # bounds memory: the ids of one chunk at a time
    for start in range(0, len(problems), chunk):
        part = problems[start : start + chunk]
        ids = prompt_spec.encode_batch([p.problem for p in part], check_length=False)
        for p, row in zip(part, ids, strict=True):
            (kept if len(row) <= limit else dropped).append(p)
    return kept, dropped
