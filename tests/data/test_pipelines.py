"""tf.data pipelines: batch format, resume determinism, unreadable files, evaluation order."""
import numpy as np
import pytest
import tensorflow as tf

from car_tf.data import pipelines, sources
from car_tf.data.sources import LabeledData


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    """3 classes x 7 JPEGs of assorted sizes."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class_{c}").mkdir()
        for i in range(7):
            h, w = rng.integers(20, 60, 2)
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            tf.io.write_file(str(root / f"class_{c}" / f"{i:03d}.jpg"), tf.io.encode_jpeg(image))
    return root


@pytest.fixture(scope="module")
def constant_images():
    """Image i is filled with the value i + 1 and labelled i % 3, so every pixel names its source."""
    n = 10
    images = np.broadcast_to(np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None], (n, 8, 8, 3))
    return LabeledData(images=images.copy(), labels=np.arange(n) % 3, class_names=["a", "b", "c"])


def batches(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def test_batch_format_and_epoch_structure(jpeg_root):
    data = sources.read_image_folder(jpeg_root)
    dataset = pipelines.train_dataset(data, recipe="imagenet", image_size=24, batch_size=4, seed=0, epochs=2)
    out = batches(dataset)
    steps = pipelines.steps_per_epoch(data, 4)
    assert steps == 5 and len(out) == 2 * steps
    for x, y in out:
        assert x.shape == (4, 24, 24, 3) and x.dtype == np.float32 and y.dtype == np.int32
        assert x.min() >= 0 and x.max() <= 255 and x.max() > 1
    for epoch in range(2):
        labels = np.concatenate([y for _, y in out[epoch * steps:(epoch + 1) * steps]])
        assert np.all(np.bincount(labels, minlength=3) <= 7)
    assert dataset.options().experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.DATA


def test_in_memory_epoch_is_a_permutation_of_augmented_sources(constant_images):
    dataset = pipelines.train_dataset(constant_images, recipe="cifar", image_size=8, batch_size=3, seed=4, epochs=2)
    out = batches(dataset)
    assert len(out) == 6
    for epoch in range(2):
        sources_seen = []
        for x, y in out[epoch * 3:(epoch + 1) * 3]:
            source = x.reshape(3, -1).max(axis=1).astype(int) - 1
            assert set(np.unique(x)) <= {0.0, *(source + 1.0)}  # only the source value and padding
            np.testing.assert_array_equal(y, source % 3)
            sources_seen += source.tolist()
        assert len(set(sources_seen)) == 9  # 9 of the 10 images, none twice


@pytest.mark.parametrize("randaugment", [False, True])
def test_resumed_run_sees_the_same_batches(jpeg_root, randaugment):
    data = sources.read_image_folder(jpeg_root)
    kwargs = dict(recipe="cifar", image_size=16, batch_size=4, seed=3, epochs=3, randaugment=randaugment)
    full = batches(pipelines.train_dataset(data, start_epoch=0, **kwargs))
    resumed = batches(pipelines.train_dataset(data, start_epoch=2, **kwargs))
    steps = pipelines.steps_per_epoch(data, 4)
    assert len(resumed) == steps
    for (x_full, y_full), (x_res, y_res) in zip(full[2 * steps:], resumed, strict=True):
        np.testing.assert_array_equal(x_res, x_full)
        np.testing.assert_array_equal(y_res, y_full)
    assert not np.array_equal(full[0][0], full[steps][0])  # epochs differ from each other


def test_seed_controls_order_and_augmentation(constant_images):
    def run(seed):
        return batches(pipelines.train_dataset(constant_images, recipe="cifar", image_size=8, batch_size=5, seed=seed))

    first, again, other = run(1), run(1), run(2)
    for (a, _), (b, _) in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for (a, _), (b, _) in zip(first, other))


def test_unreadable_file_strict_names_it_and_skip_keeps_the_epoch_full(tmp_path, jpeg_root, capfd):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(jpeg_root, root)
    bad = root / "class_1" / "003.jpg"
    bad.write_bytes(b"not a jpeg")
    data = sources.read_image_folder(root)
    kwargs = dict(recipe="cifar", image_size=16, batch_size=4, seed=0, epochs=1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="003.jpg"):
        batches(pipelines.train_dataset(data, **kwargs))
    out = batches(pipelines.train_dataset(data, skip_corrupt=True, **kwargs))
    assert len(out) == pipelines.steps_per_epoch(data, 4)
    assert "skipped" in capfd.readouterr().err
    with pytest.raises(tf.errors.InvalidArgumentError, match="003.jpg"):
        batches(pipelines.eval_dataset(data, recipe="cifar", image_size=16, batch_size=4))


def test_unreadable_last_file_is_caught_in_eval(tmp_path):
    (tmp_path / "a").mkdir()
    tf.io.write_file(str(tmp_path / "a" / "0.jpg"), tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "a" / "1.jpg").write_bytes(b"")
    data = sources.read_image_folder(tmp_path)
    with pytest.raises(tf.errors.InvalidArgumentError, match="1.jpg"):
        batches(pipelines.eval_dataset(data, recipe="cifar", image_size=8, batch_size=4))


def test_eval_keeps_order_and_remainder(jpeg_root, constant_images):
    data = sources.read_image_folder(jpeg_root)
    out = batches(pipelines.eval_dataset(data, recipe="imagenet", image_size=20, batch_size=8))
    assert [len(y) for _, y in out] == [8, 8, 5]
    np.testing.assert_array_equal(np.concatenate([y for _, y in out]), data.labels)
    assert out[0][0].shape == (8, 20, 20, 3)
    images = np.concatenate([x for x, _ in batches(pipelines.eval_dataset(
        constant_images, recipe="cifar", image_size=8, batch_size=4))])
    np.testing.assert_array_equal(images, constant_images.images.astype(np.float32))


def test_distributes_over_two_replicas(constant_images):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    dataset = pipelines.train_dataset(constant_images, recipe="cifar", image_size=8, batch_size=4, seed=0)
    per_replica = next(iter(strategy.experimental_distribute_dataset(dataset)))
    shapes = [t.shape[0] for t in strategy.experimental_local_results(per_replica[1])]
    assert shapes == [2, 2]


def test_argument_errors(constant_images):
    with pytest.raises(ValueError, match="batch_size=11"):
        pipelines.steps_per_epoch(constant_images, 11)
    with pytest.raises(ValueError, match="Unknown recipe"):
        pipelines.train_dataset(constant_images, recipe="svhn", image_size=0, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="start_epoch=3"):
        pipelines.train_dataset(constant_images, recipe="cifar", image_size=0, batch_size=2, seed=0,
                                start_epoch=3, epochs=2)
    assert pipelines.resolve_image_size("imagenet", 0) == 224
    assert pipelines.resolve_image_size("cifar", None) == 32


def test_cifar10_lt_pipeline(cifar10_dir):
    data = sources.load_dataset("cifar10", "train", data_dir=cifar10_dir, imbalance_factor=100)
    assert data.size == 12406 and pipelines.steps_per_epoch(data, 128) == 96
    dataset = pipelines.train_dataset(data, recipe="cifar", image_size=32, batch_size=128, seed=0)
    x, y = next(iter(dataset))
    assert x.shape == (128, 32, 32, 3) and y.shape == (128,)
    assert np.bincount(y.numpy(), minlength=10)[0] > np.bincount(y.numpy(), minlength=10)[9]
    test = sources.load_dataset("cifar10", "test", data_dir=cifar10_dir)
    x, y = next(iter(pipelines.eval_dataset(test, recipe="cifar", image_size=32, batch_size=256)))
    assert x.shape == (256, 32, 32, 3) and y.numpy().tolist() == [0] * 256


def test_imagenet_recipe_with_randaugment_builds_batches():
    rng = np.random.default_rng(5)
    data = LabeledData(
        images=rng.integers(0, 256, size=(8, 40, 36, 3), dtype=np.uint8),
        labels=np.arange(8) % 2,
        class_names=["a", "b"],
    )
    images, labels = next(iter(pipelines.train_dataset(
        data, recipe="imagenet", image_size=24, batch_size=4, seed=0, randaugment=True
    )))
    assert images.shape == (4, 24, 24, 3) and labels.shape == (4,)


def test_decoding_gives_the_pixels_pil_gives(jpeg_root, tmp_path):
    from PIL import Image

    gray = tmp_path / "gray.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (23, 31), dtype=np.uint8)).save(gray)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (9, 7, 4), dtype=np.uint8)).save(rgba)
    for path in [*sorted(jpeg_root.rglob("*.jpg"))[:4], gray, rgba]:
        decoded = pipelines.decode_image(tf.io.read_file(str(path))).numpy()
        np.testing.assert_array_equal(decoded, np.asarray(Image.open(path).convert("RGB")), err_msg=str(path))
