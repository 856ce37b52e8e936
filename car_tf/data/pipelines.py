"""tf.data pipelines: resumable, deterministic training stream and ordered evaluation stream.

Batches are (float32 images [B, H, W, 3] in [0, 255], int32 labels [B]). Epoch e of a training
stream depends only on (seed, e): its order is a stateless permutation keyed by (seed, e) (or,
with a re-sampling family, the draws car_tf.data.sampling keys by (seed, e)), and each image's
augmentation is keyed by (seed, e, position in the epoch). A run resumed with
start_epoch=e therefore sees exactly the batches an uninterrupted run sees.
"""

import numpy as np

from car_tf.backend import import_tensorflow
from car_tf.data import augment, sampling
from car_tf.data.recipes import DEFAULT_IMAGE_SIZE, RECIPES, resolve_image_size, steps_per_epoch  # noqa: F401

tf = import_tensorflow(__name__)

_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


def train_dataset(
    data,
    *,
    recipe,
    image_size,
    batch_size,
    seed,
    start_epoch=0,
    epochs=1,
    randaugment=False,
    skip_corrupt=False,
    batch_hook=None,
    sampler="instance",
):
    """Shuffled, augmented full batches of epochs start_epoch .. epochs - 1, epoch after epoch.

    randaugment: False, True (2 ops, magnitude 10) or a keras.layers.RandAugment to apply after the
    crop and flip. skip_corrupt: skip unreadable image files with a warning naming each and counting
    them (the epoch is refilled from a second pass so it keeps its steps); otherwise the first
    unreadable file stops the stream with an error naming it. batch_hook: a function
    ``(batches, start_epoch, steps_per_epoch) -> dataset`` applied to the stream of batches (the
    ConCutMix stage, ``car_tf.concutmix.concutmix_batch_hook``). sampler: which samples an epoch
    draws (car_tf.data.sampling.SAMPLERS): instance shuffles the data; the others draw each epoch's
    steps * batch_size indices with car_tf.data.sampling.epoch_indices, keyed by (seed, epoch).
    Long because the skip-and-refill of unreadable files and the batch hook are steps of the one stream.
    """
    sampling.check_sampler(sampler)
    image_size = resolve_image_size(recipe, image_size)
    if not 0 <= start_epoch <= epochs:
        raise ValueError(
            f"start_epoch={start_epoch} must lie in [0, epochs={epochs}]; check the resume state."
        )
    per_epoch = steps_per_epoch(data, batch_size) * batch_size
    load = _loader(data)
    if randaugment is True:
        randaugment = augment.make_randaugment()
    base_key = tf.constant([int(seed), 0], tf.int64)

    def augment_one(image, key):
        crop_key, ra_key = tf.unstack(augment.split_seed(key))
        if recipe == "cifar":
            image = augment.pad_crop_flip(augment.resize_to(image, image_size), crop_key)
        else:
            image = augment.rrc_flip(image, crop_key, image_size)
        if randaugment:
            image = augment.randaugment(image, ra_key, randaugment)
        return tf.ensure_shape(image, [image_size, image_size, 3])

    labels = np.asarray(data.labels)

    def drawn(epoch):  # the NumPy draws of car_tf.data.sampling, those of the NumPy streams too
        return sampling.epoch_indices(labels, sampler, seed, int(epoch), epochs, per_epoch)

    def epoch_order(epoch, key):
        if sampler == "instance":  # a stateless shuffle
            return tf.random.experimental.stateless_shuffle(
                tf.range(data.size, dtype=tf.int64),
                seed=tf.random.experimental.stateless_fold_in(key, _ORDER_STREAM),
            )
        order = tf.numpy_function(drawn, [epoch], tf.int64, stateful=False)
        return tf.ensure_shape(order, [per_epoch])

    def epoch_batches(epoch):
        key = tf.random.experimental.stateless_fold_in(base_key, epoch)
        order = epoch_order(epoch, key)
        order = tf.concat([order, order], 0) if skip_corrupt else order[:per_epoch]
        augment_key = tf.random.experimental.stateless_fold_in(key, _AUGMENT_STREAM)

        def load_and_augment(position):
            image, label = load(order[position])
            element_key = tf.random.experimental.stateless_fold_in(augment_key, position)
            return position, augment_one(image, element_key), label

        elements = tf.data.Dataset.range(tf.size(order, out_type=tf.int64)).map(
            load_and_augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        elements = _guard_unreadable(elements, data, order, image_size, skip_corrupt, per_epoch)
        return elements.batch(batch_size, drop_remainder=True)

    dataset = tf.data.Dataset.range(start_epoch, epochs).flat_map(epoch_batches)
    if batch_hook is not None:
        dataset = batch_hook(dataset, start_epoch, per_epoch // batch_size)
    return _finish(dataset)


def eval_dataset(data, *, recipe, image_size, batch_size):
    """All images in their given order, batched without dropping; unreadable files raise."""
    image_size = resolve_image_size(recipe, image_size)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    load = _loader(data)
    order = tf.range(data.size, dtype=tf.int64)

    def load_and_preprocess(position):
        image, label = load(position)
        if recipe == "cifar":
            image = augment.resize_to(image, image_size)
        else:
            image = augment.resize_center_crop(image, image_size)
        return position, tf.ensure_shape(image, [image_size, image_size, 3]), label

    elements = tf.data.Dataset.range(data.size).map(
        load_and_preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    elements = _guard_unreadable(elements, data, order, image_size, False, data.size)
    return _finish(elements.batch(batch_size))


def decode_image(encoded):
    """Encoded JPEG / PNG / GIF / BMP bytes -> uint8 [H, W, 3].

    JPEG uses libjpeg's accurate integer DCT, as PIL does, so that export.serve_onnx (PIL, no
    TensorFlow) sees the same pixels as training and car_tf.evaluate.
    """
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8),
    )
    return tf.ensure_shape(image, [None, None, 3])


def _loader(data):
    """index -> (float32 image [H, W, 3] in [0, 255], int32 label)."""
    labels = tf.constant(data.labels, tf.int32)
    if data.images is not None:
        images = tf.constant(data.images)
        return lambda i: (tf.cast(tf.gather(images, i), tf.float32), tf.gather(labels, i))
    paths = tf.constant(data.paths)

    def load(i):
        image = decode_image(tf.io.read_file(tf.gather(paths, i)))
        return tf.cast(image, tf.float32), tf.gather(labels, i)

    return load


def _guard_unreadable(elements, data, order, image_size, skip_corrupt, count):
    """First ``count`` (image, label) of (position, image, label) elements, naming unreadable files.

    An element that failed to load leaves a gap in the positions. Skip mode prints a warning naming
    the file with the running count of skipped files. Strict mode turns the first gap into an
    error naming the file; a sentinel after the last position exposes a gap at the very end (it is
    only pulled when an element is missing, so it never reaches the output).
    """
    if data.images is not None:
        return elements.map(_drop_position).take(count)
    paths = tf.constant(data.paths)
    last = tf.size(order, out_type=tf.int64)
    elements = elements.ignore_errors(log_warning=True)
    if not skip_corrupt:
        sentinel = (last, tf.zeros([image_size, image_size, 3], tf.float32), tf.constant(-1, tf.int32))
        elements = elements.concatenate(tf.data.Dataset.from_tensors(sentinel))

    def check(state, element):
        expected, skipped = state
        position, image, label = element
        missing = position - expected
        first_missing = tf.gather(paths, tf.gather(order, tf.minimum(expected, last - 1)))
        if skip_corrupt:
            skipped += missing
            if missing > 0:
                tf.print(
                    "car_tf: skipped", missing, "unreadable image file(s) starting with",
                    first_missing, "-", skipped, "skipped so far this epoch.",
                )
        else:
            # A tf.data graph function: a graph assertion is the only way to stop the stream here.
            tf.debugging.Assert(
                missing == 0,
                ["Could not read or decode image file", first_missing,
                 "- fix or delete it, or pass skip_corrupt=True (--skip_corrupt) to skip such files."],
            )
        return (position + 1, skipped), (image, label)

    zero = tf.constant(0, tf.int64)
    return elements.scan((zero, zero), check).take(count)


def _drop_position(position, image, label):
    return image, label


def _finish(dataset):
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
