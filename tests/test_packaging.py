"""pyproject.toml is a real package: a wheel built from it holds every module and its dependencies."""

import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_holds_every_module_and_declares_the_runtime_dependencies(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "runs"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
         "-w", str(tmp_path)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("car_tf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith("/METADATA"))
    sources = {
        str(p.relative_to(ROOT))
        for package in ("car_tf", "export")
        for p in (ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert sources and sources <= names, sorted(sources - names)
    required = {
        re.match(r"Requires-Dist: ([A-Za-z0-9_.-]+)", line).group(1).lower()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    }
    assert {"tensorflow", "keras", "absl-py", "numpy", "tf2onnx", "onnxruntime"} <= required, required
    assert "Requires-Python: >=3.11" in metadata
