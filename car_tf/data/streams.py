"""The input streams of the Keras backend in use: tf.data (car_tf.data.pipelines) under TensorFlow,
NumPy over images held in memory (car_tf.data.arrays) under JAX and PyTorch."""

import keras
from absl import logging

from car_tf import backend
from car_tf.data import arrays, sources

IN_MEMORY_LIMIT_BYTES = 16 * 2**30  # decoded training and test images beyond this are refused outside TensorFlow


def prepare(train, test, recipe, image_size):
    """(train, test) ready for the backend's streams: as they are under TensorFlow; elsewhere
    decoded into memory, after checking that the NumPy streams can serve them."""
    if backend.is_tensorflow():
        return train, test
    name = keras_backend()
    if recipe != "cifar":
        raise ValueError(
            f"--data_recipe={recipe} (random-resized crops of files) runs on tf.data; under "
            f"KERAS_BACKEND={name} the cifar recipe on images held in memory is available: pass "
            "--data_recipe=cifar with images of one size, or use the TensorFlow backend."
        )
    needed = (train.size + test.size) * image_size * image_size * 3
    if needed > IN_MEMORY_LIMIT_BYTES:
        raise ValueError(
            f"under KERAS_BACKEND={name} the images are held in memory, and these need "
            f"{needed / 2**30:.1f} GiB; use the TensorFlow backend, which streams them from disk."
        )
    if train.images is None or test.images is None:
        logging.info("Decoding %d images into memory (KERAS_BACKEND=%s).", train.size + test.size, name)
    return sources.decode_into_memory(train), sources.decode_into_memory(test)


def training_stream(data, *, recipe, image_size, batch_size, seed, start_epoch, epochs, randaugment=False,
                    skip_corrupt=False, batch_hook=None, sampler="instance"):
    """Shuffled (or re-sampled: ``sampler``, car_tf.data.sampling), augmented full batches of epochs
    start_epoch .. epochs - 1 (see train_dataset)."""
    if backend.is_tensorflow():
        from car_tf.data import pipelines

        return pipelines.train_dataset(
            data, recipe=recipe, image_size=image_size, batch_size=batch_size, seed=seed,
            start_epoch=start_epoch, epochs=epochs, randaugment=randaugment, skip_corrupt=skip_corrupt,
            batch_hook=batch_hook, sampler=sampler,
        )
    check_options(randaugment)
    if batch_hook is not None:
        raise ValueError(f"this method changes the training batches with tf.data; under KERAS_BACKEND="
                         f"{keras_backend()} it cannot run: use the TensorFlow backend.")
    return arrays.train_batches(data, image_size=image_size, batch_size=batch_size, seed=seed,
                                start_epoch=start_epoch, epochs=epochs, sampler=sampler)


def check_options(randaugment):
    """Refuses, before anything is written, what the backend's streams cannot do."""
    if randaugment and not backend.is_tensorflow():
        raise ValueError(f"--randaugment runs on tf.data; under KERAS_BACKEND={keras_backend()} leave it out, "
                         "or use the TensorFlow backend.")


def evaluation_stream(data, *, recipe, image_size, batch_size):
    """All images in their given order, in batches, for evaluation."""
    if backend.is_tensorflow():
        from car_tf.data import pipelines

        return pipelines.eval_dataset(data, recipe=recipe, image_size=image_size, batch_size=batch_size)
    return arrays.EvalBatches(data, image_size=image_size, batch_size=batch_size)


def keras_backend():
    return keras.backend.backend()
