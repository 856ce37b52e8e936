"""Balanced supervised contrastive loss of BCL (Zhu et al., CVPR 2022), as ConCutMix uses it."""
from keras import ops


def balanced_contrastive_loss(
    features,
    labels,
    prototypes,
    temperature=0.1,
    *,
    key_features=None,
    key_labels=None,
    anchor_offset=0,
):
    """Per-sample BCL loss [B] for two views laid out as ``features = [view1; view2]`` [2B, P].

    Every anchor is contrasted with every key (all view features plus the K class prototypes,
    prototype c counting as one more sample of class c). The denominator is class-averaged: each
    key's exp term is divided by the number of keys of its class in the batch (minus one for the
    anchor's own class, which excludes the anchor itself). Positives are all other keys of the
    anchor's class. The two anchors of each sample are averaged, giving one loss per sample.

    Args:
        features: L2-normalised anchor features [2B, P], rows [view1; view2].
        labels: int class ids [2B] of those rows.
        prototypes: L2-normalised class prototypes [K, P].
        temperature: softmax temperature (released: 0.1 on CIFAR, 0.07 on ImageNet-LT).
        key_features: keys [N, P] when they differ from the anchors, e.g. all replicas' features
            gathered across replicas, so that every replica sees the global batch; default
            ``features``.
        key_labels: int class ids [N] of ``key_features``.
        anchor_offset: index in ``key_features`` of the first anchor (to exclude self-pairs).
    """
    features = ops.cast(features, "float32")
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    prototypes = ops.cast(prototypes, "float32")
    if key_features is None:
        key_features, key_labels = features, labels
    num_classes = ops.shape(prototypes)[0]
    num_anchors = ops.shape(features)[0]
    num_view_keys = ops.shape(key_features)[0]

    keys = ops.concatenate([ops.cast(key_features, "float32"), prototypes], axis=0)
    key_classes = ops.concatenate(
        [ops.cast(ops.reshape(key_labels, (-1,)), "int32"), ops.arange(num_classes, dtype="int32")],
        axis=0,
    )
    class_count = ops.sum(ops.one_hot(key_classes, num_classes), axis=0)
    key_count = ops.take(class_count, key_classes)

    self_column = ops.arange(num_anchors) + anchor_offset
    not_self = 1.0 - ops.one_hot(self_column, num_view_keys + num_classes)
    positives = ops.cast(ops.equal(labels[:, None], key_classes[None, :]), "float32") * not_self

    logits = ops.matmul(features, ops.transpose(keys)) / temperature
    logits = logits - ops.stop_gradient(ops.max(logits, axis=1, keepdims=True))
    class_averaged = ops.exp(logits) * not_self / (key_count[None, :] - positives)
    log_prob = logits - ops.log(ops.sum(class_averaged, axis=1, keepdims=True))
    per_anchor = -ops.sum(positives * log_prob, axis=1) / ops.sum(positives, axis=1)
    return ops.mean(ops.reshape(per_anchor, (2, -1)), axis=0)
