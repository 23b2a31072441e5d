"""The verification worker process (see ``brts.shared.verify``): JSON lines in, JSON lines out.

Started as ``python -m brts.shared._verify_worker MEMORY_LIMIT_MB INNER_TIMEOUT_S``. It limits its own address
space, imports math-verify once, prints ``"ready"``, then answers each ``[answer, ground_truth]`` line with
``true`` or ``false``. It exits when its stdin closes, which also happens when the parent dies.
"""

from __future__ import annotations

import json
import logging
import sys


def main(memory_limit_mb: int, inner_timeout_s: int) -> None:
    try:
        import resource

        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # pragma: no cover - platforms without RLIMIT_AS
        pass
    logging.disable(logging.CRITICAL)  # math-verify logs every timeout; the parent decides what to report
    from math_verify import parse, verify

    out = sys.stdout
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        try:
            answer, ground_truth = json.loads(line)
            gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=inner_timeout_s)
            pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=inner_timeout_s)
            ok = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=inner_timeout_s))
        except BaseException:  # noqa: BLE001 - MemoryError, RecursionError, sympy errors: all mean "not correct"
            ok = False
        out.write("true\n" if ok else "false\n")
        out.flush()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
