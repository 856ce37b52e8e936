"""Labelled sources: real split lists, image folders, CIFAR trees and tarballs, TFDS, flags."""
import os
import types

import numpy as np
import tensorflow as tf
import pytest
from absl import flags

from car_tf.data import flags as data_flags
from car_tf.data import longtail, sources
from car_tf.data.sources import LabeledData


def write_list(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


TINY_JPEG = tf.io.encode_jpeg(tf.zeros([4, 4, 3], tf.uint8)).numpy()


def make_folder(root, counts):
    for c, n in enumerate(counts):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{i:03d}.jpg").write_bytes(TINY_JPEG)
        (folder / "notes.txt").write_text("not an image")
    return root


# --- real split lists --------------------------------------------------------------------------


def test_inaturalist_val_list(shared_data, tmp_path):
    data = sources.read_split_list(shared_data / "splits/iNaturalist18_val.txt", tmp_path, 8142)
    assert data.size == 24426 and data.num_classes == 8142
    assert data.counts().min() >= 1
    assert data.paths[0] == str(tmp_path / "train_val2018/Plantae/7291/9f8ecb39e5f767e39e9b28e34488f179.jpg")
    assert data.labels[0] == 7291 and data.labels.dtype == np.int32


def test_imagenet_lt_test_list(shared_data, tmp_path):
    data = sources.read_split_list(shared_data / "splits/ImageNet_LT_test.txt", tmp_path)
    assert data.size == 50000 and data.num_classes == 1000
    np.testing.assert_array_equal(data.counts(), np.full(1000, 50))
    assert data.class_names[0] == "n01440764"
    assert set(longtail.class_groups(data.counts())) == {"medium"}


def test_places_lt_train_list_counts_and_groups(shared_data, tmp_path):
    data = sources.read_split_list(shared_data / "splits/Places_LT_train.txt", tmp_path)
    counts = data.counts()
    assert data.size == 62500 and data.num_classes == 365
    assert counts.max() == 4980 and counts.min() == 5
    assert data.class_names[0] == "airfield"
    groups = longtail.class_groups(counts)
    for group, expected in zip(longtail.GROUPS, [counts > 100, (counts >= 20) & (counts <= 100), counts < 20]):
        np.testing.assert_array_equal(groups == group, expected)


def test_imagenet_lt_via_load_dataset(shared_data, tmp_path, monkeypatch):
    # ImageNet_LT_val (20 per class) stands in for the training list: every class is present.
    splits = shared_data / "splits"
    kwargs = dict(data_dir=tmp_path, train_list=splits / "ImageNet_LT_val.txt",
                  test_list=splits / "ImageNet_LT_test.txt", imbalance_factor=100)
    train = sources.load_dataset("imagenet_lt", "train", **kwargs)
    test = sources.load_dataset("imagenet_lt", "test", **kwargs)
    assert train.size == 20000  # already long-tailed benchmarks ignore the imbalance factor
    assert test.size == 50000 and test.class_names == train.class_names
    assert test.paths[0].startswith(str(tmp_path) + os.sep)


# --- errors a user can cause -------------------------------------------------------------------


def test_missing_list_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.read_split_list(tmp_path / "nope.txt", tmp_path)


def test_malformed_line_names_its_number(tmp_path):
    lst = write_list(tmp_path / "l.txt", ["a/x.jpg 0", "", "a/y.jpg one"])
    with pytest.raises(ValueError, match="line 3"):
        sources.read_split_list(lst, tmp_path)
    lst = write_list(tmp_path / "m.txt", ["a/x.jpg 0", "lonely"])
    with pytest.raises(ValueError, match="line 2"):
        sources.read_split_list(lst, tmp_path)


def test_label_out_of_range(tmp_path):
    lst = write_list(tmp_path / "l.txt", ["a/x.jpg 0", "a/y.jpg 5", "a/z.jpg -1"])
    with pytest.raises(ValueError, match=r"line 2: label 5 is outside \[0, 3\)"):
        sources.read_split_list(lst, tmp_path, num_classes=3)


def test_class_without_training_images_is_named(tmp_path):
    train = write_list(tmp_path / "train.txt", ["cat/a.jpg 0", "bird/b.jpg 2"])
    test = write_list(tmp_path / "test.txt", ["cat/c.jpg 0"])
    with pytest.raises(ValueError, match=r"Class 1 .* no training images; add images"):
        sources.load_dataset("list", "train", data_dir=tmp_path, train_list=train, test_list=test)
    data = sources.load_dataset("list", "test", data_dir=tmp_path, train_list=train, test_list=test)
    assert data.num_classes == 3 and data.class_names == ["cat", "1", "bird"]


def test_load_dataset_argument_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match="Unknown dataset"):
        sources.load_dataset("mnist", "train")
    with pytest.raises(ValueError, match="Unknown split"):
        sources.load_dataset("cifar10", "validation", data_dir=tmp_path)
    with pytest.raises(ValueError, match="--data_dir"):
        sources.load_dataset("imagenet_lt", "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.load_dataset("places_lt", "train", data_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="neither an image-folder tree"):
        sources.load_dataset("cifar10", "train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="ImageNet_LT_train.txt"):
        sources.load_dataset("imagenet_lt", "train", data_dir=tmp_path)


def test_labeled_data_validation():
    with pytest.raises(ValueError, match="exactly one"):
        LabeledData(labels=[0], class_names=["a"])
    with pytest.raises(ValueError, match="one label per image"):
        LabeledData(labels=[0, 0], class_names=["a"], paths=["/x"])
    with pytest.raises(ValueError, match="uint8"):
        LabeledData(labels=[0], class_names=["a"], images=np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        LabeledData(labels=[1], class_names=["a"], paths=["/x"])


# --- folders, CIFAR, TFDS ----------------------------------------------------------------------


def test_image_folder_order_subset_and_counts(tmp_path):
    root = make_folder(tmp_path / "tree", [3, 1, 2])
    data = sources.read_image_folder(root)
    assert data.class_names == ["class_0", "class_1", "class_2"]
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 2, 2])
    assert [os.path.basename(p) for p in data.paths[:3]] == ["000.jpg", "001.jpg", "002.jpg"]
    assert all(os.path.isabs(p) for p in data.paths)
    part = data.subset([5, 0])
    np.testing.assert_array_equal(part.labels, [2, 0])
    np.testing.assert_array_equal(part.counts(), [1, 0, 1])
    assert part.paths[0] == data.paths[5] and part.class_names == data.class_names


def test_folder_dataset_made_long_tailed(tmp_path):
    for split in ("train", "test"):
        make_folder(tmp_path / split, [10, 10, 10])
    train = sources.load_dataset("folder", "train", data_dir=tmp_path, imbalance_factor=10)
    np.testing.assert_array_equal(train.counts(), [10, 3, 1])
    assert [os.path.basename(p) for p in train.paths[10:]] == ["000.jpg", "001.jpg", "002.jpg", "000.jpg"]
    step = sources.load_dataset("folder", "train", data_dir=tmp_path, imbalance_factor=5, profile="step")
    np.testing.assert_array_equal(step.counts(), [10, 2, 2])
    test = sources.load_dataset("folder", "test", data_dir=tmp_path, imbalance_factor=10)
    np.testing.assert_array_equal(test.counts(), [10, 10, 10])


def test_cifar10_lt_from_tree(cifar10_dir):
    train = sources.load_dataset("cifar10", "train", data_dir=cifar10_dir, imbalance_factor=100)
    assert train.size == 12406
    np.testing.assert_array_equal(train.counts(), longtail.longtail_counts(5000, 10, 100))
    assert train.class_names[0] == "airplane" and train.class_names[-1] == "truck"
    truck = sorted(os.listdir(cifar10_dir / "train" / "truck"))[:50]
    decoded = [tf.io.decode_jpeg(tf.io.read_file(str(cifar10_dir / "train" / "truck" / f))).numpy() for f in truck]
    np.testing.assert_array_equal(train.images[train.labels == 9], np.stack(decoded))  # decoded once, in order
    test = sources.load_dataset("cifar10", "test", data_dir=cifar10_dir, imbalance_factor=100)
    np.testing.assert_array_equal(test.counts(), np.full(10, 1000))


def make_tarball(path, tree_root, arcname):
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        tar.add(tree_root, arcname=arcname)
    return path


def test_cifar10_from_tarball_unpacks_once(tmp_path, monkeypatch):
    # A toy tarball with the CIFAR layout; the real one is read through the cifar10_dir fixture.
    make_folder(tmp_path / "tree" / "train", [20] * 10)
    make_folder(tmp_path / "tree" / "test", [3] * 10)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    make_tarball(data_dir / "cifar10-jpg.tar.gz", tmp_path / "tree", "cifar10")
    monkeypatch.setenv(sources.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(data_dir))  # a folder holding the tarball
    train = sources.load_dataset("cifar10", "train", imbalance_factor=10)
    np.testing.assert_array_equal(train.counts(), longtail.longtail_counts(20, 10, 10))
    assert (data_dir / "cifar10-jpg" / "cifar10" / "train" / "class_0" / "000.jpg").is_file()
    assert train.images.shape == (train.size, 4, 4, 3)  # CIFAR is decoded into memory once
    marker = data_dir / "cifar10-jpg" / "unpacked-once"
    marker.write_text("")
    test = sources.load_dataset("cifar10", "test", data_dir=data_dir / "cifar10-jpg.tar.gz")
    assert test.size == 30 and marker.exists()
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar10-jpg", "cifar10-jpg.tar.gz"]


def test_tarball_in_read_only_folder_goes_to_cache(tmp_path, monkeypatch):
    make_folder(tmp_path / "tree" / "train", [2, 2])
    make_folder(tmp_path / "tree" / "test", [1, 1])
    ro = tmp_path / "ro"
    ro.mkdir()
    make_tarball(ro / "toy.tar.gz", tmp_path / "tree", "toy")
    ro.chmod(0o555)
    monkeypatch.setenv(sources.CACHE_DIR_ENV, str(tmp_path / "cache"))
    try:
        tree = sources.unpack_tarball(ro / "toy.tar.gz")
    finally:
        ro.chmod(0o755)
    assert tree.parent.parent == tmp_path / "cache" and (tree / "train" / "class_1").is_dir()
    assert sorted(p.name for p in ro.iterdir()) == ["toy.tar.gz"]


def test_load_tfds_with_patched_loader(monkeypatch):
    import tensorflow_datasets as tfds

    calls = {}

    def fake_load(name, **kwargs):
        calls.update(kwargs, name=name)
        images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
        label = types.SimpleNamespace(names=["zero", "one"])
        return (images, np.array([1, 0])), types.SimpleNamespace(features={"label": label})

    monkeypatch.setattr(tfds, "load", fake_load)
    data = sources.load_tfds("fake", "train", data_dir="/somewhere")
    assert calls["name"] == "fake" and calls["split"] == "train" and calls["data_dir"] == "/somewhere"
    assert data.images.shape == (2, 4, 4, 3) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images[..., 2], data.images[..., 0])
    assert data.class_names == ["zero", "one"] and data.labels.tolist() == [1, 0]


# --- flags -------------------------------------------------------------------------------------


def test_flags_define_twice_and_build_datasets(tmp_path):
    for split in ("train", "test"):
        make_folder(tmp_path / split, [8, 8])
    values = flags.FlagValues()
    data_flags.define_data_flags(values)
    data_flags.define_data_flags(values)
    for name in ("dataset", "data_dir", "train_list", "test_list", "imbalance_factor", "lt_profile",
                 "image_size", "skip_corrupt", "data_recipe"):
        assert values[name].help
    values(["prog", "--dataset=folder", f"--data_dir={tmp_path}", "--imbalance_factor=4"])
    train, test, recipe, image_size = data_flags.datasets_from_flags(values)
    np.testing.assert_array_equal(train.counts(), [8, 2])
    assert test.size == 16 and recipe == "imagenet" and image_size == 224
    assert data_flags.recipe_for("cifar100") == "cifar"
    assert data_flags.recipe_for("cifar100", "imagenet") == "imagenet"
    with pytest.raises(flags.IllegalFlagValueError):
        values(["prog", "--lt_profile=linear"])
