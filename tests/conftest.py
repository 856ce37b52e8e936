"""Shared test set-up: quiet TensorFlow, two logical CPU devices, real-data paths."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# JAX processes the tests start (they inherit this) compile for the CPU without LLVM's costly
# optimisation passes: the tests' models train a few steps, so compiling dominated their time,
# and what is computed is the same. Set XLA_FLAGS yourself to test with other flags.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import pathlib

import pytest
import tensorflow as tf

# Two logical CPU devices let MirroredStrategy run two replicas on a CPU-only machine.
# This must happen before TensorFlow initialises its devices, hence at import time.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA.resolve()


@pytest.fixture(scope="session")
def cifar10_dir(shared_data, tmp_path_factory):
    """The CIFAR-10 JPEG tree (train/, test/) unpacked once per session."""
    import tarfile

    out = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(shared_data / "cifar10-jpg.tar.gz") as tar:
        tar.extractall(out, filter="data")
    roots = [p for p in out.rglob("train") if p.is_dir()]
    return roots[0].parent


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A 3-class image-folder data set of 16x16 PNGs: train/ and test/ trees (train_helpers.py)."""
    from train_helpers import write_tiny_folder

    return write_tiny_folder(tmp_path_factory.mktemp("tiny"))
