"""ConCutMix label rectification (Pan et al., TIP 2024, arXiv 2407.04911, steps 3-4): pure tensor functions.

The area label of a CutMix image says how much of it came from A and from B; the semantic label
says which classes its projection lies nearest to. The rectified label blends the two with a
weight that grows with how common the mixed classes are.
"""
import numpy as np
from keras import ops

from car_tf.losses.cross_entropy import checked_class_counts
from car_tf.ops import l2_normalize

DISTANCE_FLOOR = 1e-12


def class_prototypes(classifier_kernel, projection_head, training=False):
    """One L2-normalised prototype per class: the head applied to the classifier's weight vectors.

    As in BCL, the K columns of the classifier kernel [D, K] are fed through ``projection_head``
    (D -> P) as a batch of K rows, giving prototypes [K, P]. The released ConCutMix CIFAR code
    builds 64 pseudo-prototypes instead; car_tf keeps one prototype per class, as BCL does.
    """
    weights = ops.transpose(ops.cast(classifier_kernel, "float32"))
    return l2_normalize(ops.cast(projection_head(weights, training=training), "float32"))


def semantic_label(projections, prototypes, top_k):
    """Soft label [B, K] from the ``top_k`` prototypes nearest to each projection (no gradient).

    Euclidean distances from each projection [B, P] to each prototype [K, P]; the ``top_k``
    nearest classes are weighted by 1 / distance and the weights normalised to sum 1. Classes tied
    with the k-th distance are all kept (a measure-zero event for float distances).
    """
    projections = ops.stop_gradient(ops.cast(projections, "float32"))
    prototypes = ops.stop_gradient(ops.cast(prototypes, "float32"))
    num_classes = ops.shape(prototypes)[0]
    k = min(int(top_k), int(num_classes))
    if k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1; pass a positive number of classes.")
    squared = (
        ops.sum(ops.square(projections), axis=1, keepdims=True)
        - 2.0 * ops.matmul(projections, ops.transpose(prototypes))
        + ops.sum(ops.square(prototypes), axis=1)[None, :]
    )
    distances = ops.sqrt(ops.maximum(squared, DISTANCE_FLOOR**2))
    kth_nearest = -ops.top_k(-distances, k, sorted=True)[0][:, -1:]
    weights = ops.where(distances <= kth_nearest, 1.0 / distances, 0.0)
    return weights / ops.sum(weights, axis=1, keepdims=True)


def rectification_weight(lam, counts_a, counts_b, class_counts):
    """w = log(lam * n_A + (1 - lam) * n_B) / sum_c log n_c, per example [B].

    ``counts_a`` / ``counts_b`` are the training counts of each example's classes A and B and
    ``class_counts`` all K training counts (each >= 1; if all are 1 the denominator is 0).
    """
    lam = ops.cast(lam, "float32")
    mixed_count = lam * ops.cast(counts_a, "float32") + (1.0 - lam) * ops.cast(counts_b, "float32")
    total_log = float(np.sum(np.log(checked_class_counts(class_counts))))
    if total_log <= 0.0:
        raise ValueError(
            "class_counts are all 1, so sum_c log n_c is 0; give a class more than one image."
        )
    return ops.log(mixed_count) / total_log


def rectify(area_label, semantic, w, omega, mixed_flag, epoch, warmup_epochs):
    """(w * omega) * semantic + (1 - w * omega) * area for mixed examples once epoch >= warm-up.

    ``w`` and ``mixed_flag`` are per example [B]; ``epoch`` is a scalar or [B]. Other examples keep
    their area label. The result stays a distribution when 0 <= w * omega <= 1.
    """
    area_label = ops.cast(area_label, "float32")
    active = ops.cast(mixed_flag, "float32") * ops.cast(
        ops.greater_equal(ops.cast(epoch, "float32"), float(warmup_epochs)), "float32"
    )
    coefficient = (ops.cast(w, "float32") * float(omega) * active)[:, None]
    return coefficient * ops.cast(semantic, "float32") + (1.0 - coefficient) * area_label

