"""Toy data and a tiny classifier for ConCutMix tests (tests/concutmix/, tests/car/)."""

import keras
import numpy as np
import tensorflow as tf

from car_tf.concutmix import concutmix_stage


def tiny_classifier(num_classes=4, size=8):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="classifier")(x))


def toy_data(num=240, num_classes=4, size=8, seed=0):
    """Class c: noisy images whose mean colour is distinct per class; long-tailed counts."""
    rng = np.random.default_rng(seed)
    counts = np.array([num // 2, num // 4, num // 6, num - num // 2 - num // 4 - num // 6])
    labels = np.repeat(np.arange(num_classes), counts).astype(np.int32)
    rng.shuffle(labels)
    palette = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]], np.float32)
    images = palette[labels][:, None, None, :] + rng.normal(0, 25, (num, size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels, counts


def flip(images, seed):
    return tf.image.stateless_random_flip_left_right(images, seed)


def toy_stage(images, labels, batch=16, seed=0, epochs=1):
    steps = len(labels) // batch
    stream = (
        tf.data.Dataset.from_tensor_slices((images.astype(np.float32), labels))
        .batch(batch, drop_remainder=True)
        .repeat(epochs)
    )
    return concutmix_stage(
        stream,
        (images, labels),
        num_classes=4,
        seed=seed,
        view_augment=flip,
        steps_per_epoch=steps,
    )
