"""Packaging: one `brts` namespace over the top-level folders, and the torch add-on breakage check."""

import importlib.util
import subprocess
import sys

from brts import find_environment_breakage


def test_namespace_maps_the_top_level_folders():
    for name, folder in [
        ("brts.server", "server"), ("brts.trainer", "trainer"), ("brts.shared", "shared"), ("brts.proto", "proto")
    ]:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin.replace("\\", "/").endswith(f"/{folder}/__init__.py")
    # nothing generic is importable at the top level
    for generic in ("server", "trainer", "shared", "proto"):
        found = importlib.util.find_spec(generic)
        assert found is None or "site-packages" not in (found.origin or "")


def test_cuda_addons_next_to_cpu_torch_are_reported_with_the_fix():
    msg = find_environment_breakage(
        {"torch": "2.13.0+cpu", "torchvision": "0.28.0", "torchaudio": None, "torchcodec": "0.17.0"}
    )
    assert msg is not None and "\n" not in msg
    assert "torchvision 0.28.0" in msg and "pip uninstall -y torchvision torchcodec" in msg


def test_matching_or_gpu_builds_are_fine():
    assert find_environment_breakage(
        {"torch": "2.13.0+cpu", "torchvision": "0.28.0+cpu", "torchaudio": None, "torchcodec": None}
    ) is None
    assert find_environment_breakage(
        {"torch": "2.14.1", "torchvision": "0.29.0", "torchaudio": "2.11.0", "torchcodec": None}
    ) is None
    assert find_environment_breakage(
        {"torch": "2.13.0+cpu", "torchvision": None, "torchaudio": None, "torchcodec": None}
    ) is None


def test_import_brts_is_light():
    code = "import sys, brts, brts.shared.answers, brts.shared.hints; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False"


def test_every_python_folder_is_a_declared_package():
    """A sub-package missing from pyproject's list works in the editable install but vanishes from a wheel."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(cfg["packages"])
    for name, folder in cfg["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder)
            dotted = ".".join([name, *rel.parts]) if rel.parts else name
            assert dotted in declared, f"{dotted} ({init.parent}) is not listed in [tool.setuptools] packages"
