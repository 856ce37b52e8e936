"""The linear-head workload of the CAR benchmarks: 512-d features that carry a long-tailed class."""

import resource
import time


def longtail_counts(k, n_max=1000, imbalance=100):
    """Training images per class, falling exponentially from ``n_max`` to ``n_max / imbalance``."""
    import numpy as np

    return np.maximum(np.floor(n_max * imbalance ** (-np.arange(k) / (k - 1))), 1).astype(int)


def linear_head_setup(k, rng, batch_size, batches=40):
    """(model builder, features, labels): a linear head on 512-d features that carry their
    long-tailed class, so that the model learns and its confusion moves from step to step as in
    training (random features and labels give a near-uniform confusion whose top singular vectors
    hardly change)."""
    import keras
    import numpy as np

    counts = longtail_counts(k)
    y = rng.choice(k, size=batch_size * batches, p=counts / counts.sum()).astype(np.int32)
    means = rng.normal(size=(k, 512)).astype(np.float32)
    x = (0.3 * means[y] + rng.normal(size=(len(y), 512))).astype(np.float32)
    return (lambda: keras.Sequential([keras.Input((512,)), keras.layers.Dense(k)])), x, y


def fitted(build, x, y, loss, batch_size, jit_compile=False):
    """(model, dataset, fit options): a compiled model traced and warmed up by 3 steps."""
    import keras
    import tensorflow as tf

    import car_tf

    model = build()
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss=loss, jit_compile=jit_compile)
    callbacks = [car_tf.CARCallback(loss)] if isinstance(loss, car_tf.CARLoss) else []
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).repeat()
    run = dict(epochs=1, verbose=0, callbacks=callbacks)
    model.fit(data, steps_per_epoch=3, **run)
    return model, data, run


def seconds_per_step(setup, steps):
    model, data, run = setup
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, **run)
    return (time.perf_counter() - start) / steps


def peak_rss_mib():
    """This process's peak resident memory in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
