"""`make bench` / `python -m bench [NAME ...]`: run the benchmarks (all CPU ones by default), one after another.

Each is a standalone script that prints its own table of side-by-side ratios; run one alone for its options
(`python bench/bench_cache.py --help`). The GPU checks (gpu_check.py, gpu_update_check.py) need CUDA and are
only run when named.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
CPU = ["bench_loss_memory", "bench_scoring_memory", "bench_generation", "bench_cache", "bench_server", "bench_update",
       "bench_train_step"]


def main(argv: list[str]) -> int:
    names = argv or CPU
    unknown = [n for n in names if not (HERE / f"{n}.py").is_file()]
    if unknown:
        known = sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))
        print(f"bench: unknown {', '.join(unknown)}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / f"{name}.py")]).returncode:
            failed.append(name)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
