"""Which training samples an epoch draws: the re-sampling families of long-tailed recognition (pure NumPy).

Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition" (ICLR 2020)
write every family as a class probability p_j, followed by a uniform draw of one of class j's n_j
samples (N samples in all, K classes that have at least one sample):

- ``instance``: p_j = n_j / N, every sample equally likely: an epoch is a shuffle of the data,
  each sample at most once (the streams' order before samplers existed).
- ``class_balanced``: p_j = 1 / K.
- ``square_root``: p_j proportional to sqrt(n_j).
- ``progressive``: from instance to class-balanced linearly over the run's E epochs,
  p_j(e) = (1 - e/E) n_j / N + (e/E) / K in epoch e (counted from 0).

The last three draw the epoch's samples independently (with replacement within a class). Every
draw comes from a generator keyed by (seed, epoch) alone, so epoch e of a resumed run draws what
an uninterrupted run draws, and the three input streams (tf.data, NumPy, cached features) draw the
same indices from the same labels. A class with no sample is never drawn (it has p_j = 0).
"""

import numpy as np

SAMPLERS = ("instance", "class_balanced", "square_root", "progressive")
ORDER_STREAM = 0  # the generator stream of an epoch's sample order (augmentation uses others)


def epoch_rng(seed, epoch, stream):
    """The random generator of one (seed, epoch) and stream: the same numbers whenever it is made."""
    return np.random.default_rng([int(seed), int(epoch), stream])


def check_sampler(sampler):
    """Refuses an unknown sampler name in one sentence."""
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler={sampler} is not known; use one of {', '.join(SAMPLERS)}.")


def class_probabilities(counts, sampler, epoch=0, epochs=1):
    """float64 [C]: the probability that a draw of epoch ``epoch`` (of ``epochs``) is of class j.

    counts: the n_j of the training samples per class (zero for a class without any, which gets 0).
    """
    check_sampler(sampler)
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 1 or (counts < 0).any() or not counts.sum() > 0:
        raise ValueError("the class counts must be a list of non-negative numbers with at least one sample.")
    if epochs < 1 or not 0 <= epoch <= epochs:
        raise ValueError(f"epoch={epoch} must lie in [0, epochs={epochs}] with epochs at least 1.")
    instance = counts / counts.sum()
    present = (counts > 0).astype(np.float64)
    balanced = present / present.sum()
    if sampler == "instance":
        return instance
    if sampler == "class_balanced":
        return balanced
    if sampler == "square_root":
        root = np.sqrt(counts)
        return root / root.sum()
    progress = epoch / epochs
    return (1.0 - progress) * instance + progress * balanced


def epoch_indices(labels, sampler, seed, epoch, epochs, count):
    """int64 [count]: the sample indices of epoch ``epoch`` (of ``epochs``), in the order they are used.

    ``instance`` takes the first ``count`` of a permutation of the samples (each at most once, so
    ``count`` may not exceed their number); the other samplers draw ``count`` classes from
    ``class_probabilities`` and then a uniform sample of each drawn class. Depends only on
    (labels, sampler, seed, epoch, epochs, count).
    """
    check_sampler(sampler)
    labels = np.asarray(labels).astype(np.int64, copy=False)
    count = int(count)
    rng = epoch_rng(seed, epoch, ORDER_STREAM)
    if sampler == "instance":
        if count > labels.size:
            raise ValueError(f"an instance-sampled epoch holds each of the {labels.size} samples at most once, "
                             f"not {count}.")
        return rng.permutation(labels.size)[:count].astype(np.int64)
    counts = np.bincount(labels)
    probabilities = class_probabilities(counts, sampler, epoch, epochs)
    classes = rng.choice(counts.size, size=count, p=probabilities)
    by_class = np.argsort(labels, kind="stable")  # class 0's samples, then class 1's, ...
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    within = rng.integers(0, np.maximum(counts[classes], 1))  # drawn classes all have a sample
    return by_class[starts[classes] + within].astype(np.int64)
