"""The NumPy input streams (the JAX / PyTorch pipeline): augmentation against a per-image
reference, determinism per (seed, epoch), resuming, and one-sentence refusals."""

import numpy as np
import pytest

from car_tf.data import arrays
from car_tf.data.sources import LabeledData


def in_memory(n=20, side=8, seed=0):
    rng = np.random.default_rng(seed)
    return LabeledData(images=rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),
                       labels=np.arange(n) % 3, class_names=["a", "b", "c"])


def test_pad_crop_flip_matches_a_per_image_reference():
    images = in_memory(n=64).images
    out = arrays.pad_crop_flip(images, np.random.default_rng(5))
    # The same draws, one image at a time: pad by 4, crop at (top, left), mirror.
    rng = np.random.default_rng(5)
    top, left, flip = rng.integers(0, 9, 64), rng.integers(0, 9, 64), rng.random(64) < 0.5
    for i, image in enumerate(images):
        crop = np.pad(image, ((4, 4), (4, 4), (0, 0)))[top[i]:top[i] + 8, left[i]:left[i] + 8]
        np.testing.assert_array_equal(out[i], crop[:, ::-1] if flip[i] else crop)
    assert out.dtype == np.float32 and flip.any() and not flip.all()
    assert (out == 0).all(axis=(1, 2, 3)).sum() == 0 and (top != 4).any()  # shifted, never blank


def collect(stream):
    return [(x.copy(), y.copy()) for x, y in stream]


def test_each_epoch_depends_only_on_seed_and_epoch_and_a_resumed_stream_repeats_it():
    data = in_memory()
    full = collect(arrays.train_batches(data, image_size=8, batch_size=6, seed=3, epochs=3))
    assert len(full) == 3 * 3  # 20 // 6 full batches an epoch, the remainder dropped
    resumed = collect(arrays.train_batches(data, image_size=8, batch_size=6, seed=3, start_epoch=1, epochs=3))
    for (x, y), (rx, ry) in zip(full[3:], resumed):
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)
    other = collect(arrays.train_batches(data, image_size=8, batch_size=6, seed=4, epochs=1))
    assert not np.array_equal(other[0][0], full[0][0])
    assert not np.array_equal(full[0][1], full[3][1]) or not np.array_equal(full[0][0], full[3][0])
    # Every image of an epoch is drawn at most once.
    epoch_labels = np.concatenate([y for _, y in full[:3]])
    assert epoch_labels.size == 18 and np.bincount(epoch_labels).max() <= 7


def test_evaluation_batches_keep_the_order_and_the_last_partial_batch():
    data = in_memory(n=7)
    batches = arrays.EvalBatches(data, image_size=8, batch_size=3)
    assert len(batches) == 3 and [len(y) for _, y in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), data.images.astype(np.float32))
    assert len(list(batches)) == 3  # iterable again, once per epoch


def test_an_error_in_the_background_thread_reaches_the_consumer():
    def broken():
        yield 1
        raise ValueError("a batch failed")

    stream = arrays._prefetched(broken())
    assert next(stream) == 1
    with pytest.raises(ValueError, match="a batch failed"):
        next(stream)


def test_images_of_another_size_or_on_disk_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="the images are 8x8 pixels but --image_size is 16"):
        arrays.EvalBatches(in_memory(), image_size=16, batch_size=4)
    on_disk = LabeledData(paths=[str(tmp_path / "a.png")], labels=[0], class_names=["a"])
    with pytest.raises(ValueError, match="needs the images in memory"):
        arrays.train_batches(on_disk, image_size=8, batch_size=1, seed=0)
