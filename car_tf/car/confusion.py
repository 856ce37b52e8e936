"""CAR's differentiable confusion surrogate, frequency weights and EMA (CAR, CVPR 2026, arXiv 2603.16732).

Pure functions of tensors; the state that carries the EMA across steps lives in ``state.py``.
Conventions: rows are predicted classes i, columns are true classes j, the diagonal is zero.

Soft labels (ConCutMix's mixed labels) are handled by fractional membership: a sample whose label
row is y counts toward each of its ``label_classes`` heaviest classes j with weight y_j (of classes
of equal weight, the lowest class ids: the same classes on every backend). A sample weight s (Keras's
``sample_weight``) multiplies its memberships: a sample of weight 0 (padding) counts as if it were not
in the batch, one of weight 2 as two copies of it. Column j of the batch confusion is then the
weighted sum of its members' contributions divided by max(1, their total weight), which reduces to
the released code's mean over the members of class j for one-hot labels and unit weights.

A batch fills at most B * m of the K columns, so the EMA is stored as Cbar[:, j] = d_j * M[j, :]:
a decay multiplies the vector d (O(K)); the batch's columns are rescaled and added to M and their
d_j reset to 1 (O(K * B)). That is the exact recurrence Cbar_t = beta Cbar_{t-1} + (1 - beta) C_t,
and the only K x K array is M.
"""

from keras import ops

from car_tf.backend import widest_float


def label_memberships(y_true, num_classes, label_classes=2):
    """Returns (class ids [B, m], weights [B, m]) for int labels [B]/[B, 1] or soft labels [B, K].

    A soft label counts toward its m = ``label_classes`` heaviest classes; where classes tie for the
    last places (label smoothing's equal light classes), the lowest class ids are taken, on every
    backend (PyTorch's top_k breaks ties otherwise than TensorFlow's and JAX's). The ids of a row
    are in ascending order.
    """
    y_true = ops.convert_to_tensor(y_true)
    is_soft = len(y_true.shape) == 2 and y_true.shape[-1] == num_classes and num_classes > 1
    if not is_soft:
        ids = ops.reshape(ops.cast(y_true, "int32"), (-1, 1))
        return ids, ops.ones(ops.shape(ids), "float32")
    soft = ops.cast(y_true, "float32")
    ids = _heaviest_classes(soft, min(label_classes, num_classes))
    return ids, ops.take_along_axis(soft, ids, axis=1)


def _heaviest_classes(soft, m):
    """Ids [B, m] of each row's m largest entries, ties broken toward the lowest id, ascending.

    top_k's values do not depend on how it breaks ties, so its m-th value is a threshold: every
    entry above it is taken, and of the entries equal to it the first ones, as many as there is room.
    """
    num_classes = soft.shape[-1]
    threshold = ops.top_k(soft, k=m)[0][:, m - 1 : m]
    above = ops.cast(soft > threshold, "int32")
    tied = ops.cast(soft == threshold, "int32")
    room = m - ops.sum(above, axis=1, keepdims=True)
    chosen = ops.logical_or(above > 0, ops.logical_and(tied > 0, ops.cumsum(tied, axis=1) <= room))
    # Distinct keys, so any top_k gives the same ids: the chosen classes by ascending id first.
    index = ops.cast(ops.arange(num_classes), "float32")[None, :]
    key = ops.where(chosen, -index, -index - num_classes)
    return ops.cast(ops.top_k(key, k=m)[1], "int32")


def contributions(
    logits,
    y_true,
    temperature=1.0,
    margin=0.0,
    differentiable_gate=False,
    label_classes=2,
    sample_weight=None,
):
    """Per-membership rows of the surrogate: (contrib [B*m, K], true class [B*m], weight [B*m]).

    contrib[q, i] = weight_q * gate(f_i - f_j + margin) * softmax(f / temperature)_i for i != j
    (0 at i = j), j the row's true class, with the sigmoid gate under stop-gradient unless
    ``differentiable_gate``. weight_q is the label's weight of class j times the sample's weight
    (``sample_weight`` [B], default 1), so a sample of weight 0 contributes nothing. The rows are
    all a batch contributes, so replicas can exchange them (B * m * K numbers) instead of K x K
    matrices.
    """
    logits = ops.cast(logits, "float32")
    num_classes = logits.shape[-1]
    ids, weights = label_memberships(y_true, num_classes, label_classes)
    if sample_weight is not None:
        sample_weight = ops.reshape(ops.cast(sample_weight, "float32"), (-1, 1))
        weights = weights * sample_weight  # [B, m]; a single weight broadcasts over the batch
    true_logit = ops.take_along_axis(logits, ids, axis=1)  # [B, m]
    rows = ops.expand_dims(logits, 1)  # [B, 1, K]; a reshape, whose gradient costs nothing
    # Each B x K op costs a few percent of a linear head's step at K = 8,142, so the released
    # defaults (gamma 0, tau 1) skip theirs.
    difference = rows - true_logit[:, :, None]  # f_i - f_j
    gate = ops.sigmoid(difference + margin if margin else difference)
    if not differentiable_gate:
        gate = ops.stop_gradient(gate)
    probs = ops.softmax(rows / temperature if temperature != 1.0 else rows, axis=-1)
    is_true = ops.arange(num_classes, dtype="int32") == ids[:, :, None]  # [B, m, K]
    contrib = ops.where(is_true, 0.0, gate * probs) * weights[:, :, None]  # [B, m, K]
    return (
        ops.reshape(contrib, (-1, num_classes)),
        ops.reshape(ids, (-1,)),
        ops.reshape(weights, (-1,)),
    )


def column_scales(ids, weights, num_classes):
    """(1 / max(1, mass_j) for each row's class j [B*m], class mass [K]): C_t's normaliser."""
    mass = ops.segment_sum(weights, ids, num_segments=num_classes)
    return ops.take(1.0 / ops.maximum(mass, 1.0), ids), mass


def batch_confusion(logits, y_true, **kwargs):
    """The dense batch surrogate C_t [K, K] of CAR (CVPR 2026; options as in contributions).

    C_t[i, j] = sum over rows q of class j of contrib[q, i] / max(1, mass_j). Training never forms
    it: the EMA takes the scaled rows directly (``CARState.update_ema``).
    """
    contrib, ids, weights = contributions(logits, y_true, **kwargs)
    num_classes = contrib.shape[-1]
    scale, _ = column_scales(ids, weights, num_classes)
    by_true_class = ops.segment_sum(contrib * scale[:, None], ids, num_segments=num_classes)
    return ops.transpose(by_true_class)


def frequency_weights(class_counts, r0=0.2, count_based=False):
    """w_j = 1 / sqrt(m_j + r0), mean-normalised and clamped at 1e-3.

    m_j = n_j / N (released code) or, with ``count_based``, m_j = n_j (about 10x more spread).
    """
    counts = ops.cast(ops.convert_to_tensor(class_counts), "float32")
    m = counts if count_based else counts / ops.sum(counts)
    w = 1.0 / ops.sqrt(m + r0)
    return ops.maximum(w / ops.mean(w), 1e-3)


def ema_coefficients(beta, initialized, updating):
    """(decay of the stored EMA, weight of C_t) for one step of the EMA recurrence.

    Cbar_t = decay * Cbar_{t-1} + weight * C_t with (beta, 1 - beta) while training. ``initialized``
    0 means no history yet: the step sets Cbar_t = C_t (the released code's first step; the paper's
    Cbar_0 = 0 is ``initialized = 1`` on a zero EMA). ``updating`` 0 (evaluation) gives (1, 0).
    Float64 (float32 under JAX without x64), so that a column absent for n steps decays by beta^n
    to float32 accuracy.
    """
    initialized = ops.cast(initialized, widest_float())
    updating = ops.cast(updating, widest_float())
    decay = beta * initialized
    return updating * decay + (1.0 - updating), updating * (1.0 - decay)


__all__ = [
    "batch_confusion",
    "column_scales",
    "contributions",
    "ema_coefficients",
    "frequency_weights",
    "label_memberships",
]
