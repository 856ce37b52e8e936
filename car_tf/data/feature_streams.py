"""Input streams over cached backbone features (README, "The pretrained track").

The same contract as the image streams (car_tf.data.streams): full training batches of
(float32 features [B, D], int32 labels [B]) whose samples in epoch e depend only on (seed, e) (a
shuffle, or the draws of a re-sampling family: car_tf.data.sampling), so a resumed run sees the
batches of an uninterrupted one; evaluation batches in the data's order.
No augmentation: the features of a frozen backbone are computed once, from unaugmented images.
"""

import numpy as np

from car_tf import backend
from car_tf.data import sampling
from car_tf.data.arrays import InOrderBatches


def epoch_order(labels, batch_size, seed, epoch, *, sampler="instance", epochs=1):
    """The sample indices of epoch ``epoch``'s (of ``epochs``) full batches, concatenated."""
    size = len(labels)
    if batch_size < 1 or size < batch_size:
        raise ValueError(f"batch_size={batch_size} does not fit {size} training samples; "
                         "use a batch size between 1 and the number of samples.")
    steps = size // batch_size
    return sampling.epoch_indices(labels, sampler, seed, epoch, epochs, steps * batch_size)


def training_stream(features, labels, *, batch_size, seed, start_epoch, epochs, sampler="instance"):
    """Shuffled (or re-sampled: ``sampler``) full batches of epochs start_epoch .. epochs - 1
    (tf.data under TensorFlow)."""
    sampling.check_sampler(sampler)
    if not 0 <= start_epoch <= epochs:
        raise ValueError(f"start_epoch={start_epoch} must lie in [0, epochs={epochs}]; check the resume state.")
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, np.int32)
    order = np.concatenate(
        [epoch_order(labels, batch_size, seed, e, sampler=sampler, epochs=epochs) for e in range(start_epoch, epochs)]
        or [np.zeros(0, np.int64)]
    )
    if backend.is_tensorflow():
        import tensorflow as tf

        table_x, table_y = tf.constant(features), tf.constant(labels)
        picks = tf.data.Dataset.from_tensor_slices(order.astype(np.int64)).batch(batch_size, drop_remainder=True)
        gather = lambda idx: (tf.gather(table_x, idx), tf.gather(table_y, idx))  # noqa: E731
        return picks.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    return (
        (features[order[i : i + batch_size]], labels[order[i : i + batch_size]])
        for i in range(0, len(order), batch_size)
    )


def evaluation_batches(features, labels, batch_size):
    """All samples in their given order, in batches (the last one smaller); iterable again and again."""
    return InOrderBatches(np.asarray(features, np.float32), np.asarray(labels, np.int32), batch_size)
