"""CIFAR-10-LT for the benchmarks: from ../shared/data's JPEG tarball, or synthetic where it is absent."""

import pathlib
import tarfile

import numpy as np

from car_tf.data import LabeledData, load_dataset, read_image_folder
from car_tf.data.longtail import longtail_counts, subsample_longtail

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TARBALL = SHARED_DATA / "cifar10-jpg.tar.gz"


def cifar10_lt(workdir):
    """{source name: LabeledData} for CIFAR-10-LT from the tarball, or synthetic when absent."""
    if not TARBALL.is_file():
        counts = longtail_counts(5000, 10, 100)
        labels = np.repeat(np.arange(10), counts).astype(np.int32)
        images = np.random.default_rng(0).integers(0, 256, (labels.size, 32, 32, 3), np.uint8)
        names = [str(c) for c in range(10)]
        return {"synthetic memory": LabeledData(labels=labels, class_names=names, images=images)}
    with tarfile.open(TARBALL) as tar:
        tar.extractall(workdir, filter="data")
    tree = next(p.parent for p in pathlib.Path(workdir).rglob("train") if p.is_dir())
    memory = load_dataset("cifar10", "train", data_dir=tree, imbalance_factor=100)  # decoded once
    folder = read_image_folder(tree / "train")
    files = folder.subset(subsample_longtail(folder.labels, memory.counts()))
    return {"JPEG files": files, "memory (what car_tf.train uses for CIFAR)": memory}
