"""Regenerate the committed gRPC modules from ``proto/teacher.proto``.

The generated ``teacher_pb2*.py`` files are committed so that a plain install needs no grpcio-tools;
``tests/test_proto.py`` regenerates them into a temporary folder and fails when the committed copies are
stale. The include path is mapped as ``brts/proto=<proto dir>`` (platform-notes §5) so the generated
``teacher_pb2_grpc`` imports ``from brts.proto import teacher_pb2`` with no post-processing.

Run: ``python -m brts.proto.generate`` (or ``make proto``).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = "teacher.proto"
GENERATED = ("teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into ``out_dir`` and return the paths of the generated modules (flat, in ``out_dir``)."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # grpcio-tools is a dev-only dependency
        raise RuntimeError("grpcio-tools is missing: pip install 'brts[dev]' (keep torch==2.13.0 on the line)") from exc
    import grpc_tools

    work = Path(tempfile.mkdtemp(prefix="brts-proto-"))
    try:
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-Ibrts/proto={PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={work}",
            f"--pyi_out={work}",
            f"--grpc_python_out={work}",
            f"brts/proto/{PROTO_FILE}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_DIR / PROTO_FILE}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copyfile(work / "brts" / "proto" / name, target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    for path in generate(PROTO_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
