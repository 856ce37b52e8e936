"""CAR's penalty as the paper writes it: plain, differentiable keras.ops, for reading and testing.

CARLoss computes the same value and gradient without ever forming a K x K gradient (it keeps the
EMA column by column and follows sigma_max by a warm-started power iteration); this module is
what it is held against (tests/car/test_reference.py). Rows are predicted classes i, columns true
classes j (SPEC: "Confusion surrogate").
"""

from keras import ops


def frequency_weights(class_counts, r0=0.2):
    """w_j = 1 / sqrt(n_j / N + r0), divided by its mean, at least 1e-3."""
    counts = ops.convert_to_tensor(class_counts, "float32")
    weights = 1.0 / ops.sqrt(counts / ops.sum(counts) + r0)
    return ops.maximum(weights / ops.mean(weights), 1e-3)


def batch_confusion(logits, labels, num_classes, temperature=1.0):
    """C_t [K, K]: C[i, j] = mean over the batch's samples q of class j of
    sg(sigmoid(f_i - f_j)) softmax(f / tau)_i, zero on the diagonal (0 for absent classes)."""
    true_logit = ops.take_along_axis(logits, ops.expand_dims(labels, 1), axis=1)
    gate = ops.stop_gradient(ops.sigmoid(logits - true_logit))
    onehot = ops.one_hot(labels, num_classes)
    contributions = gate * ops.softmax(logits / temperature, axis=-1) * (1.0 - onehot)
    counts = ops.maximum(ops.sum(onehot, axis=0), 1.0)
    return ops.matmul(ops.transpose(contributions), onehot) / counts[None, :]


def ema_step(previous, batch, beta):
    """Cbar_t = beta sg(Cbar_{t-1}) + (1 - beta) C_t; the first step (no previous) sets Cbar = sg(C_1),
    as the released code does."""
    if previous is None:
        return ops.stop_gradient(batch)
    return beta * ops.stop_gradient(previous) + (1.0 - beta) * batch


def penalty(ema, weights):
    """sigma_max(Cbar diag(w)), the largest singular value, differentiable through the SVD."""
    return ops.svd(ema * weights[None, :], compute_uv=False)[0]
