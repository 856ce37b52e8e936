"""Stateless augmentation: same seed, same result eagerly and inside tf.data; geometry checked."""
import numpy as np
import pytest
import tensorflow as tf

from car_tf.data import augment

SEED = tf.constant([7, 11], tf.int64)


def random_image(h, w, seed=0):
    return tf.constant(np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.float32))


def in_dataset_map(fn, image, seed):
    """fn(image, seed) run inside tf.data.Dataset.map."""
    dataset = tf.data.Dataset.from_tensors((image, seed)).map(fn)
    return next(iter(dataset)).numpy()


def coordinate_image(h, w):
    """Channel 0 = column index, channel 1 = row index, channel 2 = 0."""
    cols, rows = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return tf.constant(np.stack([cols, rows, np.zeros_like(cols)], -1))


RANDOM_OPS = {
    "flip": augment.random_flip,
    "pad_crop_flip": augment.pad_crop_flip,
    "random_resized_crop": lambda x, s: augment.random_resized_crop(x, s, 24),
    "rrc_flip": lambda x, s: augment.rrc_flip(x, s, 24),
}


@pytest.mark.parametrize("name", sorted(RANDOM_OPS))
def test_eager_equals_dataset_map_and_seed_matters(name):
    fn = RANDOM_OPS[name]
    image = random_image(36, 40)
    eager = fn(image, SEED).numpy()
    np.testing.assert_array_equal(in_dataset_map(fn, image, SEED), eager)
    np.testing.assert_array_equal(fn(image, SEED).numpy(), eager)
    outputs = {fn(image, tf.constant([7, s], tf.int64)).numpy().tobytes() for s in range(8)}
    assert len(outputs) > 1
    assert eager.dtype == np.float32 and eager.min() >= 0 and eager.max() <= 255


def test_flip_is_identity_or_mirror_and_both_happen():
    image = random_image(5, 6).numpy()
    flipped = 0
    for s in range(16):
        out = augment.random_flip(image, tf.constant([1, s])).numpy()
        if np.array_equal(out, image[:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(out, image)
    assert 0 < flipped < 16


def test_pad_crop_flip_is_a_crop_of_the_zero_padded_image():
    image = random_image(32, 32).numpy() + 1.0  # no pixel is 0, so padding is recognisable
    padded = np.pad(image, [(4, 4), (4, 4), (0, 0)])
    windows = {(dy, dx, f): (padded[dy:dy + 32, dx:dx + 32][:, ::-1] if f else padded[dy:dy + 32, dx:dx + 32])
               for dy in range(9) for dx in range(9) for f in (0, 1)}
    seen = set()
    for s in range(12):
        out = augment.pad_crop_flip(tf.constant(image), tf.constant([3, s])).numpy()
        assert out.shape == (32, 32, 3)
        matches = [k for k, w in windows.items() if np.array_equal(out, w)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 6


def test_random_resized_crop_box_respects_scale_and_ratio():
    h, w, size = 96, 128, 32
    image = coordinate_image(h, w)
    for s in range(10):
        out = augment.random_resized_crop(image, tf.constant([5, s]), size).numpy()
        assert out.shape == (size, size, 3)
        # Resizing keeps the crop's coordinates, up to half a source pixel at the borders.
        box_w = out[..., 0].max() - out[..., 0].min() + 1
        box_h = out[..., 1].max() - out[..., 1].min() + 1
        area = box_w * box_h / (h * w)
        assert 0.08 * 0.8 <= area <= 1.0 + 1e-6
        assert 0.75 * 0.85 <= box_w / box_h <= 4 / 3 * 1.15
        # Columns increase left to right, rows top to bottom: no flip, no transpose.
        assert np.all(np.diff(out[..., 0], axis=1) >= 0) and np.all(np.diff(out[..., 1], axis=0) >= 0)


def test_random_resized_crop_full_scale_is_a_plain_resize():
    image = random_image(20, 20)
    out = augment.random_resized_crop(image, SEED, 10, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(out, tf.image.resize(image, [10, 10]), atol=1e-4)


def test_resize_center_crop_matches_reference():
    image = random_image(64, 48)
    out = augment.resize_center_crop(image, 28).numpy()
    # Reference: short side 48 -> round(28 / 0.875) = 32, so 64 x 48 -> 43 x 32; central 28 x 28.
    resized = tf.image.resize(image, [43, 32], antialias=True).numpy()
    np.testing.assert_allclose(out, resized[7:35, 2:30], atol=1e-4)
    np.testing.assert_allclose(in_dataset_map(lambda x, s: augment.resize_center_crop(x, 28), image, SEED), out)


def test_resize_to_is_exact_at_the_same_size():
    image = random_image(32, 32)
    np.testing.assert_array_equal(augment.resize_to(image, 32), image)
    assert augment.resize_to(random_image(20, 24), 32).shape == (32, 32, 3)
    np.testing.assert_array_equal(in_dataset_map(lambda x, s: augment.resize_to(x, 32), image, SEED), image)


def test_randaugment_is_seeded_per_image_and_order_free():
    layer = augment.make_randaugment(num_ops=2, magnitude=10)
    images = tf.stack([random_image(24, 24, seed=i) for i in range(6)])
    seeds = tf.constant([[9, i] for i in range(6)], tf.int64)
    eager = np.stack([augment.randaugment(images[i], seeds[i], layer).numpy() for i in range(6)])
    mapped = tf.data.Dataset.from_tensor_slices((images, seeds)).map(
        lambda x, s: augment.randaugment(x, s, layer), num_parallel_calls=4, deterministic=True
    )
    np.testing.assert_allclose(np.stack(list(mapped.as_numpy_iterator())), eager, atol=1e-4)
    assert eager.min() >= 0 and eager.max() <= 255
    assert not np.allclose(eager, images.numpy())  # something was applied
    other = augment.randaugment(images[0], tf.constant([10, 0], tf.int64), layer).numpy()
    again = augment.randaugment(images[0], seeds[0], layer).numpy()
    np.testing.assert_array_equal(again, eager[0])
    assert not np.array_equal(other, eager[0])
