"""ConCutMix tf.data stage: balanced sampling, CutMix provenance and labels, determinism."""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from car_tf.concutmix import balanced_indices, concutmix_batch_hook, concutmix_stage
from car_tf.concutmix.cutmix import cutmix_box
from car_tf.concutmix.stage import batch_seed, concutmix_batch
from car_tf.data import LabeledData, steps_per_epoch, train_dataset
from car_tf.data.augment import batch_pad_crop_flip, pad_crop_flip, per_image

# Upper 0.1% points of the chi-square distribution (tables), by degrees of freedom.
CHI2_CRITICAL_0001 = {3: 16.266, 9: 27.877}
SIZE = 12
NUM_CLASSES = 5


def identity(images, seed):
    del seed
    return images


def source_arrays(num=40):
    """Source image j is constant: channel 0 = 100 + j (its index), channel 1 = 10 * label."""
    labels = np.arange(num, dtype=np.int32) % NUM_CLASSES
    images = np.zeros((num, SIZE, SIZE, 3), np.uint8)
    images[..., 0] = (100 + np.arange(num))[:, None, None]
    images[..., 1] = (10 * labels)[:, None, None]
    return images, labels


def stream_batches(num_batches=6, batch=8, seed=0):
    """Image A i is constant: channel 0 = i, channel 1 = 250 (marks A pixels)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((num_batches * batch, SIZE, SIZE, 3), np.float32)
    images[..., 0] = np.arange(num_batches * batch)[:, None, None]
    images[..., 1] = 250.0
    labels = rng.integers(0, NUM_CLASSES, num_batches * batch).astype(np.int32)
    return images, labels


def stream(num_batches=6, batch=8, seed=0):
    images, labels = stream_batches(num_batches, batch, seed)
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch, drop_remainder=True)


def test_balanced_indices_uniform_over_classes_and_members():
    counts = np.array([2000, 800, 300, 120, 60, 25, 12, 6, 4, 2])
    labels = np.repeat(np.arange(10), counts)
    np.random.default_rng(0).shuffle(labels)
    picked = np.asarray(balanced_indices(labels, 5000, tf.constant([3, 4])))
    assert picked.dtype == np.int32 and picked.min() >= 0 and picked.max() < labels.size
    observed = np.bincount(labels[picked], minlength=10)
    expected = 5000 / 10
    assert np.sum((observed - expected) ** 2 / expected) < CHI2_CRITICAL_0001[9]
    # Within a class every image is equally likely (class 8 has 4 images).
    members = np.flatnonzero(labels == 8)
    within = np.array([np.sum(picked == m) for m in members])
    assert within.sum() == observed[8]
    assert np.sum((within - within.mean()) ** 2 / within.mean()) < CHI2_CRITICAL_0001[3]


def test_balanced_indices_deterministic_eager_and_in_map():
    labels = np.repeat(np.arange(4), [50, 10, 3, 1])
    eager = [balanced_indices(labels, 16, batch_seed(7, 0, i)).numpy() for i in range(3)]
    mapped = tf.data.Dataset.range(3).map(
        lambda i: balanced_indices(labels, 16, batch_seed(7, 0, i))
    )
    for a, b in zip(eager, mapped, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    assert not np.array_equal(eager[0], eager[1])


@pytest.mark.parametrize("height,width,pad", [(6, 7, 2), (32, 32, 4), (224, 160, 4)])
def test_batch_pad_crop_flip_is_a_crop_or_mirrored_crop(height, width, pad):
    # Pixel values 1..255, so a pad pixel (0) can never pass for an image pixel.
    images = np.random.default_rng(0).integers(1, 256, (16, height, width, 3)).astype(np.float32)
    seed = tf.constant([5, 6])
    eager = batch_pad_crop_flip(images, seed, pad=pad).numpy()
    mapped = next(iter(tf.data.Dataset.from_tensors(images).map(
        lambda x: batch_pad_crop_flip(x, seed, pad=pad)
    )))
    np.testing.assert_array_equal(eager, mapped.numpy())
    padded = np.pad(images, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    offsets = range(2 * pad + 1)
    flips = []
    for out, source in zip(eager, padded, strict=True):
        crops = [source[dy : dy + height, dx : dx + width] for dy in offsets for dx in offsets]
        found = [
            flip
            for crop in crops
            for flip in (False, True)
            if np.array_equal(out, crop[:, ::-1] if flip else crop)
        ]
        assert found, "output is not a crop of the padded image"
        flips.append(found[0])
    assert 0 < sum(flips) < len(flips)


def test_cutmix_box_clipped_and_lam_from_area():
    clipped = 0
    for i in range(200):
        seeds = tf.random.experimental.stateless_split(tf.constant([i, 1], tf.int64), 3)
        y1, y2, x1, x2, lam = (t.numpy() for t in cutmix_box(SIZE, 10, *tf.unstack(seeds)))
        assert 0 <= y1 <= y2 <= SIZE and 0 <= x1 <= x2 <= 10
        assert lam == pytest.approx(1.0 - (y2 - y1) * (x2 - x1) / (SIZE * 10), abs=1e-6)
        clipped += int(y1 == 0 or x1 == 0 or y2 == SIZE or x2 == 10)
    assert clipped > 20  # clipping happens, and lam follows the clipped box


def test_stage_pixel_provenance_and_area_label():
    source = source_arrays()
    out = list(
        concutmix_stage(
            stream(num_batches=12),
            source,
            num_classes=NUM_CLASSES,
            seed=5,
            view_augment=identity,
            steps_per_epoch=6,
        )
    )
    images_a, labels_a = stream_batches(num_batches=12)
    mixed_batches = pasted = 0
    for i, el in enumerate(out):
        el = {k: v.numpy() for k, v in el.items()}
        batch = slice(8 * i, 8 * i + 8)
        np.testing.assert_array_equal(el["label_a"], labels_a[batch])
        np.testing.assert_array_equal(el["view1"], images_a[batch])
        np.testing.assert_array_equal(el["epoch"], np.full(8, i // 6))
        np.testing.assert_allclose(el["area_label"].sum(axis=1), 1.0, atol=1e-6)
        from_b = el["mixed"][..., 1] != 250.0  # [B, H, W]
        lam = el["lam"]
        assert np.all(lam == lam[0]) and np.all(el["mixed_flag"] == el["mixed_flag"][0])
        np.testing.assert_allclose(lam, 1.0 - from_b.mean(axis=(1, 2)), atol=1e-6)
        if el["mixed_flag"][0] == 0:
            assert lam[0] == 1.0 and not from_b.any()
            np.testing.assert_array_equal(el["mixed"], images_a[batch])
        else:
            mixed_batches += 1
            assert np.all(from_b == from_b[0])  # one box for the whole batch
            rows, cols = np.nonzero(from_b[0])
            pasted += int(rows.size > 0)
            if rows.size:  # the B region is a solid rectangle
                assert from_b[0].sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
                b_index = el["mixed"][:, rows[0], cols[0], 0].astype(int) - 100
                np.testing.assert_array_equal(source[1][b_index], el["label_b"])
                np.testing.assert_array_equal(
                    el["mixed"][:, rows[0], cols[0], 1], 10.0 * el["label_b"]
                )
        onehot = np.eye(NUM_CLASSES)
        expected = lam[:, None] * onehot[el["label_a"]] + (1 - lam[:, None]) * onehot[el["label_b"]]
        np.testing.assert_allclose(el["area_label"], expected, atol=1e-6)
    assert 2 <= mixed_batches <= 10 and pasted >= 1


def test_stage_eager_equals_map_and_resume():
    source = source_arrays()
    images, labels = stream_batches(num_batches=4, seed=1)
    kwargs = dict(
        num_classes=NUM_CLASSES,
        view_augment=per_image(pad_crop_flip),
        partner_augment=per_image(pad_crop_flip),
        cutmix_prob=0.5,
    )
    full = list(
        concutmix_stage(stream(4, seed=1), source, seed=3, steps_per_epoch=2, **kwargs)
    )
    for i, el in enumerate(full):
        eager = concutmix_batch(
            images[8 * i : 8 * i + 8],
            labels[8 * i : 8 * i + 8],
            batch_seed(3, i // 2, i % 2),
            load_balanced=lambda idx: tf.gather(tf.constant(source[0]), idx),
            balanced_labels=source[1],
            **kwargs,
        )
        for key, value in eager.items():
            np.testing.assert_array_equal(value.numpy(), el[key].numpy(), err_msg=key)
    assert not np.array_equal(full[0]["view1"], full[0]["view2"])
    # A run resumed at epoch 1 on epoch 1's stream sees the same batches.
    resumed_stream = stream(4, seed=1).skip(2)
    resumed = list(
        concutmix_stage(resumed_stream, source, seed=3, steps_per_epoch=2, start_epoch=1, **kwargs)
    )
    for a, b in zip(full[2:], resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)


def test_file_backed_source_matches_in_memory(tmp_path):
    images, labels = source_arrays(10)
    paths = []
    for j, image in enumerate(images):
        paths.append(str(tmp_path / f"{j}.png"))
        Image.fromarray(image).save(paths[-1])
    files = LabeledData(labels=labels, class_names=list("abcde"), paths=np.array(paths))
    kwargs = dict(num_classes=NUM_CLASSES, seed=2, view_augment=identity, cutmix_prob=1.0)
    from_files = next(iter(concutmix_stage(stream(1), files, image_size=SIZE, **kwargs)))
    in_memory = next(iter(concutmix_stage(stream(1), (images, labels), **kwargs)))
    for key in in_memory:
        np.testing.assert_array_equal(from_files[key].numpy(), in_memory[key].numpy())


def test_training_stream_resumes_exactly():
    images, labels = source_arrays(48)
    data = LabeledData(labels=labels, class_names=list("abcde"), images=images)
    steps = steps_per_epoch(data, 8)

    def run(start_epoch):
        return list(
            train_dataset(
                data, recipe="cifar", image_size=SIZE, batch_size=8, seed=9,
                start_epoch=start_epoch, epochs=3,
                batch_hook=concutmix_batch_hook(data, recipe="cifar", image_size=SIZE, seed=9),
            )
        )

    full, resumed = run(0), run(2)
    assert len(full) == 3 * steps and len(resumed) == steps
    assert [int(el["epoch"][0]) for el in full] == [e for e in range(3) for _ in range(steps)]
    for a, b in zip(full[2 * steps :], resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)


@pytest.mark.parametrize("recipe,randaugment", [("imagenet", False), ("cifar", True)])
def test_training_stream_other_recipes(recipe, randaugment):
    images, labels = source_arrays(16)
    data = LabeledData(labels=labels, class_names=list("abcde"), images=images)

    def run():
        hook = concutmix_batch_hook(
            data, recipe=recipe, image_size=10, seed=1, cutmix_prob=1.0, randaugment=randaugment
        )
        stream = train_dataset(
            data, recipe=recipe, image_size=10, batch_size=8, seed=1, randaugment=randaugment,
            batch_hook=hook,
        )
        return next(iter(stream))

    first, second = run(), run()
    for key in ("mixed", "view1", "view2"):
        assert first[key].shape == (8, 10, 10, 3)
        assert 0.0 <= float(tf.reduce_min(first[key])) and float(tf.reduce_max(first[key])) <= 255.0
    for key in first:
        np.testing.assert_array_equal(first[key].numpy(), second[key].numpy(), err_msg=key)


def test_stage_errors_are_clear():
    images, labels = source_arrays()
    with pytest.raises(ValueError, match="cutmix_prob"):
        concutmix_stage(
            stream(1), (images, labels), num_classes=5, seed=0, view_augment=identity, cutmix_prob=2
        )
    with pytest.raises(ValueError, match="num_classes"):
        concutmix_stage(stream(1), (images, labels), num_classes=3, seed=0, view_augment=identity)
    with pytest.raises(ValueError, match="image_size"):
        source = type("Files", (), {"images": None, "paths": np.array(["x"]), "labels": [0]})()
        concutmix_stage(stream(1), source, num_classes=5, seed=0, view_augment=identity)
