"""Per-image augmentation with stateless random ops: same seed tensor, same result, anywhere.

Every function takes a float32 image [H, W, 3] with values in [0, 255] and, where random, a seed
tensor of shape [2] (int32 or int64). Results are identical eagerly and inside tf.data.
"""
import keras

from car_tf.backend import import_tensorflow
from car_tf.data.recipes import CIFAR_PAD

tf = import_tensorflow(__name__)

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
EVAL_CROP_FRACTION = 0.875


def split_seed(seed, num=2):
    """``num`` independent seeds [num, 2] derived from one seed [2]."""
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num)


def random_flip(image, seed):
    """Mirrors the image left-right with probability 1/2."""
    return tf.image.stateless_random_flip_left_right(image, seed)


def pad_crop_flip(image, seed, pad=CIFAR_PAD):
    """CIFAR training augmentation: zero-pad by ``pad``, random crop back to H x W, random flip."""
    crop_seed, flip_seed = tf.unstack(split_seed(seed))
    shape = tf.shape(image)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    cropped = tf.image.stateless_random_crop(padded, shape, crop_seed)
    return random_flip(cropped, flip_seed)


def random_resized_crop(image, seed, image_size, scale=RRC_SCALE, ratio=RRC_RATIO):
    """Inception crop: a box of area fraction in ``scale`` and aspect ratio in ``ratio``, resized.

    Falls back to the whole image when no box fits after 10 attempts.
    """
    shape = tf.shape(image)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, size)
    resized = tf.image.resize(crop, [image_size, image_size], method="bilinear", antialias=False)
    return tf.ensure_shape(resized, [image_size, image_size, 3])  # RandAugment needs static channels


def rrc_flip(image, seed, image_size):
    """ImageNet training augmentation: random-resized crop then random flip."""
    crop_seed, flip_seed = tf.unstack(split_seed(seed))
    return random_flip(random_resized_crop(image, crop_seed, image_size), flip_seed)


def resize_to(image, image_size):
    """Resizes to image_size x image_size (bilinear); a no-op when already that size."""
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
    return tf.cond(
        same,
        lambda: tf.ensure_shape(image, [None, None, 3]),
        lambda: tf.image.resize(image, [image_size, image_size], method="bilinear"),
    )


def resize_center_crop(image, image_size, crop_fraction=EVAL_CROP_FRACTION):
    """ImageNet evaluation: shorter side to round(image_size / crop_fraction), central crop."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    short_side = tf.round(image_size / crop_fraction)
    new_shape = tf.cast(tf.round(shape * short_side / tf.reduce_min(shape)), tf.int32)
    resized = tf.image.resize(image, new_shape, method="bilinear", antialias=True)
    top = (new_shape[0] - image_size) // 2
    left = (new_shape[1] - image_size) // 2
    return tf.slice(resized, [top, left, 0], [image_size, image_size, 3])


class _StatelessSeeds(keras.random.SeedGenerator):
    """Stands in for a layer's SeedGenerator: each draw folds a counter into one fixed seed tensor."""

    def __init__(self, seed):  # no state variable on purpose: draws depend only on ``seed``
        self._seed = tf.cast(seed, tf.int64)
        self._draws = 0

    def next(self, ordered=True):
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._draws)


def make_randaugment(num_ops=2, magnitude=10):
    """keras.layers.RandAugment for [0, 255] images; ``magnitude`` on the usual 0..30 scale."""
    return keras.layers.RandAugment(value_range=(0, 255), num_ops=num_ops, factor=magnitude / 30.0)


def randaugment(image, seed, layer):
    """Applies a keras.layers.RandAugment ``layer`` to one image, driven by ``seed`` alone.

    The layer's own SeedGenerator is a variable advanced by every call, so in a parallel tf.data map
    its draws depend on call order; it is swapped for stateless draws from ``seed`` while tracing.
    """
    own_generator = layer.generator
    # object.__setattr__: a built Keras layer refuses new tracked state; this swap is temporary.
    object.__setattr__(layer, "generator", _StatelessSeeds(seed))
    try:
        out = layer(image, training=True)
    finally:
        object.__setattr__(layer, "generator", own_generator)
    return tf.clip_by_value(tf.cast(out, tf.float32), 0.0, 255.0)


def per_image(augment_fn):
    """Turns a per-image ``augment_fn(image, seed)`` into a batch ``augment(images, seed)``.

    Each image gets its own seed split from the batch seed (e.g. ``per_image(pad_crop_flip)``).
    """

    def augment(images, seed):
        seeds = tf.random.experimental.stateless_split(
            tf.cast(seed, tf.int64), tf.shape(images)[0]
        )
        return tf.map_fn(
            lambda args: augment_fn(args[0], args[1]),
            (images, seeds),
            fn_output_signature=tf.float32,
        )

    return augment


def batch_pad_crop_flip(images, seed, pad=CIFAR_PAD):
    """Vectorised CIFAR augmentation of a batch: zero-pad, random crop back, random flip.

    Same distribution as ``per_image(pad_crop_flip)`` (each image its own offsets and flip) but
    drawn batch-wide and applied by one nearest-neighbour ``crop_and_resize``, whose boxes may
    reach past the image (zero fill, i.e. the padding) and run right to left (the flip).
    """
    offset_seed, flip_seed = tf.unstack(split_seed(seed))
    shape = tf.shape(images)
    batch = shape[0]
    offsets = tf.random.stateless_uniform(
        [batch, 2], offset_seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32
    )
    flip = tf.random.stateless_uniform([batch, 1], flip_seed) < 0.5
    size = tf.cast(shape[1:3], tf.float32)  # (H, W)
    first = tf.cast(offsets - pad, tf.float32)  # source row / column of output pixel 0
    last = first + size - 1.0
    flip_columns = tf.concat([tf.zeros_like(flip), flip], axis=1)
    first, last = tf.where(flip_columns, last, first), tf.where(flip_columns, first, last)
    # Sample points sit on whole pixels, where float error could push an edge pixel just outside
    # the image (zero fill) or a pad pixel just inside. Pulling every point towards the centre by a
    # quarter pixel per image side keeps the rounding (nearest) and the inside test exact.
    centre, pull = (size - 1.0) / 2.0, 1.0 - 0.25 / size
    first, last = centre + (first - centre) * pull, centre + (last - centre) * pull
    boxes = tf.concat([first, last], axis=1) / tf.tile(tf.maximum(size - 1.0, 1.0), [2])
    out = tf.image.crop_and_resize(
        images, boxes, tf.range(batch), shape[1:3], method="nearest"
    )
    return tf.ensure_shape(out, images.shape)
