"""benchmarks/gpu_cifar10_lt.py end to end on CPU: one epoch of CE and of CAR on logit adjustment
(two of its five recipes, to keep CI short) under JAX with TensorFlow unimportable, on a small
CIFAR-shaped tarball."""

import io
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from backend_env import without_tensorflow, write_tensorflow_stub
from train_helpers import ROOT

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar_like_tarball(path, train_per_class=20, test_per_class=5):
    """cifar10/train/<class>/*.jpg and cifar10/test/<class>/*.jpg, 32 x 32, one colour per class.

    At --imbalance_factor=2, 20 a class keep 140 training images: one step of the script's batch
    128, the least it accepts, so CPU time goes to the code paths rather than to repeated steps."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for c, name in enumerate(CLASSES):
                for i in range(count):
                    pixels = np.clip(rng.normal(25 * c, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                    data = io.BytesIO()
                    Image.fromarray(pixels).save(data, format="JPEG")
                    info = tarfile.TarInfo(f"cifar10/{split}/{name}/{i:04d}.jpg")
                    info.size = data.tell()
                    data.seek(0)
                    tar.addfile(info, data)


@pytest.mark.slow
def test_the_gpu_script_trains_its_recipes_side_by_side_and_prints_the_table(tmp_path):
    carry = tmp_path / "carry"
    carry.mkdir()
    cifar_like_tarball(carry / "cifar10-jpg.tar.gz")
    (tmp_path / "stub").mkdir()
    env = without_tensorflow(write_tensorflow_stub(tmp_path / "stub"), "jax")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_cifar10_lt.py", f"--carry={carry}", f"--output_dir={out}",
         "--budget_s=900", "--max_epochs=1", "--imbalance_factor=2", "--timing_steps=1",
         "--methods=ce,car_logit_adjusted"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "gpu_table.md").read_text()
    assert table in done.stdout and "Step time at batch 128: CE" in done.stdout
    for method in ("ce", "car_logit_adjusted"):
        line = next(l for l in table.splitlines() if l.startswith(f"| {method} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == "1/1" and float(cells[2]) >= 0 and cells[7] != "-", line  # finished, with train accuracy
        assert (out / "runs" / method / "report.json").exists()
    assert "| ce | 1/1 |" in table and table.splitlines()[4].endswith("| 70.36 |")
    assert "Stopped" not in table and "Failed" not in table
    assert "--epochs=1 --warmup_epochs=0 --lr_decay_epochs=1" in done.stdout  # the recipe, cut to one epoch
