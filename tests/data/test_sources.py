"""Labelled sources: real split lists, image folders, CIFAR trees and tarballs, TFDS, flags."""
import os
import types

import numpy as np
import tensorflow as tf
import pytest
from absl import flags
from PIL import Image

from car_tf.data import flags as data_flags
from car_tf.data import loading, longtail, sources
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
        (folder / ".DS_Store").write_text("hidden: left out")
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


def test_list_labels_are_the_lists_numbers_and_folders_only_name_them(tmp_path):
    train = write_list(tmp_path / "train.txt", ["cat/a.jpg 0", "dog/b.jpg 1", "ship/c.jpg 2"])
    test = write_list(tmp_path / "test.txt", ["val/ship/x.jpg 2", "val/cat/y.jpg 0", "val/dog/z.jpg 1"])
    data = sources.load_dataset("list", "test", data_dir=tmp_path, train_list=train, test_list=test)
    assert data.class_names == ["cat", "dog", "ship"] and data.labels.tolist() == [2, 0, 1]
    # A test list that numbers the folders otherwise keeps its numbers; the folders then name nothing.
    other = write_list(tmp_path / "other.txt", ["ship/x.jpg 0", "cat/y.jpg 1", "dog/z.jpg 2"])
    data = sources.load_dataset("list", "test", data_dir=tmp_path, train_list=train, test_list=other)
    assert data.class_names == ["0", "1", "2"] and data.labels.tolist() == [0, 1, 2]
    short = write_list(tmp_path / "short.txt", ["cat/y.jpg 0", "dog/z.jpg 1", "frog/f.jpg 3"])
    with pytest.raises(ValueError, match=r"no images of training class\(es\) 'ship' and has class\(es\) "
                                         r"'frog' that the training data lacks; give both splits"):
        sources.load_dataset("list", "test", data_dir=tmp_path, train_list=train, test_list=short)


def test_list_classes_without_folder_names_match_by_label(tmp_path):
    train = write_list(tmp_path / "train.txt", ["a.jpg 0", "b.jpg 1", "c.jpg 2"])
    test = write_list(tmp_path / "test.txt", ["x.jpg 2", "y.jpg 0", "z.jpg 1"])
    data = sources.load_dataset("list", "test", data_dir=tmp_path, train_list=train, test_list=test)
    assert data.labels.tolist() == [2, 0, 1] and data.class_names == ["0", "1", "2"]
    missing = write_list(tmp_path / "missing.txt", ["x.jpg 2", "y.jpg 0"])
    with pytest.raises(ValueError, match=r"no images of training class\(es\) '1'.*\(matched by label id\)\.$"):
        sources.load_dataset("list", "test", data_dir=tmp_path, train_list=train, test_list=missing)


def test_list_dataset_needs_both_lists(tmp_path):
    train = write_list(tmp_path / "train.txt", ["a.jpg 0", "b.jpg 1"])
    for split in ("train", "test"):
        with pytest.raises(ValueError, match="needs both --train_list and --test_list"):
            sources.load_dataset("list", split, data_dir=tmp_path, train_list=train)


def test_comments_and_blank_lines_keep_true_line_numbers(tmp_path):
    lst = write_list(tmp_path / "l.txt", ["# path label", "", "a/x.jpg 0", "", "  # note", "a/y.jpg 7"])
    with pytest.raises(ValueError, match=r"l.txt, line 6: label 7 is outside \[0, 3\)"):
        sources.read_split_list(lst, tmp_path, num_classes=3)
    data = sources.read_split_list(lst, tmp_path)
    assert data.size == 2 and data.labels.tolist() == [0, 7]


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
    assert sources.load_dataset("folder", "train", data_dir=tmp_path).counts().tolist() == [10, 10, 10]
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
    # Decoded once, in order, with the same pixels as PIL (what export.serve_onnx decodes with).
    decoded = [np.asarray(Image.open(cifar10_dir / "train" / "truck" / f).convert("RGB")) for f in truck]
    np.testing.assert_array_equal(train.images[train.labels == 9], np.stack(decoded))
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


def test_cifar_tree_with_a_bad_image_is_refused_naming_it(tmp_path):
    # The parallel decode fails as a whole; the error still names the file, in one sentence.
    make_folder(tmp_path / "cifar10" / "train", [6] * 10)
    make_folder(tmp_path / "cifar10" / "test", [2] * 10)
    broken = tmp_path / "cifar10" / "train" / "class_3" / "004.jpg"
    broken.write_bytes(TINY_JPEG[:40])
    with pytest.raises(ValueError, match=f"^Image {broken} cannot be decoded; replace or remove the file.$"):
        sources.load_dataset("cifar10", "train", data_dir=tmp_path)
    broken.write_bytes(tf.io.encode_jpeg(tf.zeros([5, 4, 3], tf.uint8)).numpy())
    first = tmp_path / "cifar10" / "train" / "class_0" / "000.jpg"
    with pytest.raises(ValueError, match=f"^Image {broken} is 5x4 pixels, unlike {first} \\(4x4\\); resize"):
        sources.load_dataset("cifar10", "train", data_dir=tmp_path)
    test = sources.load_dataset("cifar10", "test", data_dir=tmp_path)
    assert test.images.shape == (20, 4, 4, 3) and test.paths is None


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
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir: types.SimpleNamespace(is_prepared=lambda: True))
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
    values(["prog", "--dataset=folder", f"--data_dir={tmp_path}", "--imbalance_factor=4", "--data_recipe=imagenet"])
    train, test, recipe, image_size = loading.load_datasets(data_flags.data_config(values))
    np.testing.assert_array_equal(train.counts(), [8, 2])
    assert test.size == 16 and recipe == "imagenet" and image_size == 224
    assert loading.recipe_for("cifar100") == "cifar"
    assert loading.recipe_for("cifar100", "imagenet") == "imagenet"
    with pytest.raises(flags.IllegalFlagValueError):
        values(["prog", "--lt_profile=linear"])


def test_folder_is_read_as_it_is_and_subsampled_by_class_size(tmp_path, caplog):
    for split, counts in (("train", [12, 30, 5]), ("test", [2, 2, 2])):
        make_folder(tmp_path / split, counts)
    values = flags.FlagValues()
    data_flags.define_data_flags(values)
    values(["prog", "--dataset=folder", f"--data_dir={tmp_path}"])
    assert values.imbalance_factor is None
    train, *_ = loading.load_datasets(data_flags.data_config(values))
    assert train.counts().tolist() == [12, 30, 5]  # as it is
    # Ranked by size: class_1 (30) gets n_max, class_0 (12) n_1 = floor(30 / 10^0.5), class_2 n_2.
    with caplog.at_level("INFO", logger="absl"):
        train = sources.load_dataset("folder", "train", data_dir=tmp_path, imbalance_factor=10)
    assert train.counts().tolist() == [9, 30, 3]
    assert [os.path.basename(p) for p in train.paths[:9]] == [f"{i:03d}.jpg" for i in range(9)]
    assert "kept 42 of 47 images: 9 class_0, 30 class_1, 3 class_2" in caplog.text
    with pytest.raises(ValueError, match=r"Class 0 \('class_0'\) has 12 images but the long-tailed profile "
                                         r"asks for 15; pass a larger --imbalance_factor, or leave it out"):
        sources.load_dataset("folder", "train", data_dir=tmp_path, imbalance_factor=4)


def test_cifar_keeps_the_standard_profile_by_default(tmp_path, monkeypatch):
    seen = {}

    def fake_load(name, split, imbalance_factor=None, **kwargs):
        seen[split] = imbalance_factor
        return LabeledData(labels=[0, 1], class_names=["a", "b"], images=np.zeros((2, 4, 4, 3), np.uint8))

    monkeypatch.setattr(sources, "load_dataset", fake_load)
    values = flags.FlagValues()
    data_flags.define_data_flags(values)
    values(["prog", "--dataset=cifar10"])
    loading.load_datasets(data_flags.data_config(values))
    assert seen == {"train": 100.0, "test": None}
    values(["prog", "--dataset=cifar10", "--imbalance_factor=10"])
    loading.load_datasets(data_flags.data_config(values))
    assert seen["train"] == 10.0


def test_folder_test_classes_match_by_name(tmp_path):
    make_folder(tmp_path / "train", [3, 3, 3])
    (tmp_path / "test").mkdir()
    for name in ("class_2", "class_0", "class_1"):
        (tmp_path / "test" / name).mkdir()
        (tmp_path / "test" / name / "x.jpg").write_bytes(TINY_JPEG)
    test = sources.load_dataset("folder", "test", data_dir=tmp_path)
    assert test.class_names == ["class_0", "class_1", "class_2"] and test.labels.tolist() == [0, 1, 2]
    (tmp_path / "test" / "class_1" / "x.jpg").unlink()  # an empty folder is a missing class
    with pytest.raises(ValueError, match=r"has no images of training class\(es\) 'class_1'; give both"):
        sources.load_dataset("folder", "test", data_dir=tmp_path)
    (tmp_path / "test" / "class_1" / "x.jpg").write_bytes(TINY_JPEG)
    (tmp_path / "test" / "zebra").mkdir()
    (tmp_path / "test" / "zebra" / "z.jpg").write_bytes(TINY_JPEG)
    with pytest.raises(ValueError, match=r"has class\(es\) 'zebra' that the training data lacks"):
        sources.load_dataset("folder", "test", data_dir=tmp_path)


def _broken_files(folder):
    """A truncated JPEG, a text file named .jpg, an empty .png and a JPEG with trailing bytes (fine)."""
    big = tf.io.encode_jpeg(tf.cast(tf.random.stateless_uniform([40, 40, 3], [1, 2], 0, 255), tf.uint8))
    big = big.numpy()
    (folder / "truncated.jpg").write_bytes(big[: len(big) // 2])
    (folder / "text.jpg").write_text("this is not a picture\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "padded.jpg").write_bytes(big + b"\x00\x00trailing")
    return big


def test_image_file_problems_are_found_up_front(tmp_path):
    _broken_files(tmp_path)
    (tmp_path / "good.jpg").write_bytes(TINY_JPEG)
    problem = {name: sources.image_file_problem(str(tmp_path / name))
               for name in ("truncated.jpg", "text.jpg", "empty.png", "padded.jpg", "good.jpg", "gone.jpg")}
    assert problem == {
        "truncated.jpg": "is a truncated or corrupt JPEG file",
        "text.jpg": "is not a JPEG, PNG, GIF or BMP image",
        "empty.png": "is empty",
        "padded.jpg": None,  # libjpeg decodes it: not refused
        "good.jpg": None,
        "gone.jpg": "does not exist",
    }


def test_corrupt_images_refused_in_one_sentence_or_skipped(tmp_path):
    make_folder(tmp_path / "train", [4, 4])
    make_folder(tmp_path / "test", [2, 2])
    _broken_files(tmp_path / "train" / "class_0")
    (tmp_path / "test" / "class_1" / "bad.jpg").write_text("nope")
    values = flags.FlagValues()
    data_flags.define_data_flags(values)
    values(["prog", "--dataset=folder", f"--data_dir={tmp_path}"])
    with pytest.raises(ValueError) as error:
        loading.load_datasets(data_flags.data_config(values))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"The training image {tmp_path / 'train' / 'class_0'}")
    assert "(and 2 more unreadable training images)" in message and "--skip_corrupt" in message
    values(["prog", "--dataset=folder", f"--data_dir={tmp_path}", "--skip_corrupt"])
    train, test, _, _ = loading.load_datasets(data_flags.data_config(values))
    assert train.counts().tolist() == [5, 4]  # 4 good + padded.jpg; 3 unreadable left out
    assert len(train.skipped) == 3 and test.counts().tolist() == [2, 2]
    assert test.skipped == (f"{tmp_path / 'test' / 'class_1' / 'bad.jpg'}: is not a JPEG, PNG, GIF or BMP image",)
    # Subsampling counts readable images only: the profile holds for what is trained on.
    values(["prog", "--dataset=folder", f"--data_dir={tmp_path}", "--skip_corrupt", "--imbalance_factor=2"])
    assert loading.load_datasets(data_flags.data_config(values))[0].counts().tolist() == [5, 2]


def test_missing_list_file_image_is_named_with_its_path(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(TINY_JPEG)
    train = write_list(tmp_path / "train.txt", ["a/x.jpg 0", "a/missing.jpg 0"])
    values = flags.FlagValues()
    data_flags.define_data_flags(values)
    values(["prog", "--dataset=list", f"--data_dir={tmp_path}", f"--train_list={train}", f"--test_list={train}"])
    with pytest.raises(ValueError, match=r"The training image .*a/missing.jpg does not exist; replace or remove"):
        loading.load_datasets(data_flags.data_config(values))


def test_auto_recipe_follows_the_image_size(tmp_path, caplog):
    for split in ("train", "test"):
        make_folder(tmp_path / split, [2, 2])  # 4x4 images
    values = flags.FlagValues()
    data_flags.define_data_flags(values)
    values(["prog", "--dataset=folder", f"--data_dir={tmp_path}"])
    with caplog.at_level("INFO", logger="absl"):
        *_, recipe, image_size = loading.load_datasets(data_flags.data_config(values))
    assert (recipe, image_size) == ("cifar", 4)
    assert "up to 4 pixels a side, so the cifar recipe at 4 pixels" in caplog.text
    big = tf.io.encode_png(tf.zeros([70, 90, 3], tf.uint8)).numpy()
    (tmp_path / "train" / "class_0" / "000.jpg").unlink()
    (tmp_path / "train" / "class_0" / "big.png").write_bytes(big)
    assert loading.load_datasets(data_flags.data_config(values))[2:] == ("imagenet", 224)
    values(["prog", "--dataset=folder", f"--data_dir={tmp_path}", "--data_recipe=cifar"])
    assert loading.load_datasets(data_flags.data_config(values))[2:] == ("cifar", 32)


def test_tfds_cifar10_reaches_the_download_and_offline_is_one_sentence(tmp_path, monkeypatch):
    # The real TFDS builder runs (imports, dataset info, preparation) up to its download call.
    import socket

    import requests
    import tensorflow_datasets as tfds

    asked = []

    def offline(self, urls):
        asked.append(urls)
        raise requests.exceptions.ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", offline)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port: [("resolved", host)])
    with pytest.raises(OSError) as error:
        sources.load_tfds("cifar10", "train", data_dir=tmp_path / "tfds")
    assert asked and "cifar-10" in str(asked[0])
    message = str(error.value)
    assert message.startswith("cifar10 could not be downloaded by TensorFlow Datasets (Failed to resolve")
    assert "point --data_dir (or $CAR_TF_DATA_DIR) at a local copy" in message and "\n" not in message

    def no_dns(host, port):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # found before any download is tried
    asked.clear()
    with pytest.raises(OSError, match=r"cifar10 could not be downloaded .*Name or service not known"):
        sources.load_tfds("cifar10", "train", data_dir=tmp_path / "tfds")
    assert not asked
