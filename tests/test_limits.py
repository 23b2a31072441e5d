"""Size limits on production code: no file over 500 lines, no function or method over 80 lines.

Why a test: long files and functions are where one concern quietly grows into several, and a reviewer cannot
hold an 880-line module or a 110-line function in their head. The limits are checked by walking the source with
``ast`` (nothing is imported), so the test costs a fraction of a second and names every offender at once, with
its length, rather than stopping at the first. Generated protobuf modules (``proto/*_pb2*.py``) are exempt.
A function's length is its ``def`` line through its last line (``end_lineno - lineno + 1``), decorators excluded.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The folders that ship in the ``brts`` wheel (pyproject's package-dir), i.e. production code.
PRODUCTION_FOLDERS = ("brts", "server", "trainer", "shared", "proto")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def _is_generated(path: Path) -> bool:
    return path.parent.name == "proto" and "_pb2" in path.stem


def production_files() -> list[Path]:
    """Every hand-written Python file of the production folders, sorted."""
    return sorted(p for folder in PRODUCTION_FOLDERS for p in (ROOT / folder).rglob("*.py") if not _is_generated(p))


def _qualified_functions(tree: ast.AST) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method with a dotted name (``Class.method``, ``outer.inner``) so a report is findable."""
    found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                found.append((name, child))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def size_offenders(paths: list[Path]) -> list[str]:
    """One line per file over :data:`MAX_FILE_LINES` and per function over :data:`MAX_FUNCTION_LINES`."""
    offenders = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(ROOT).as_posix()
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            offenders.append(f"{where}: file has {lines} lines (limit {MAX_FILE_LINES})")
        for name, node in _qualified_functions(ast.parse(text, filename=where)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                offenders.append(f"{where}:{node.lineno} {name}: {length} lines (limit {MAX_FUNCTION_LINES})")
    return offenders


def test_production_files_and_functions_stay_within_the_size_limits():
    offenders = size_offenders(production_files())
    assert not offenders, f"{len(offenders)} over the size limits:\n" + "\n".join(offenders)


def test_the_walk_finds_the_production_code():
    """Guards against a silent pass: a moved folder would otherwise leave nothing to check."""
    names = {p.relative_to(ROOT).as_posix() for p in production_files()}
    assert {"brts/cli.py", "server/app.py", "trainer/main.py", "shared/config.py"} <= names
    assert not any("_pb2" in n for n in names)
