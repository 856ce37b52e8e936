"""Per-class evaluation metrics for long-tailed classification, in NumPy.

Confusion matrices follow CAR's convention: rows are predicted classes i, columns are true
classes j, so ``C[i, j]`` counts samples of true class j predicted as i and column j sums to the
number of test samples of class j. Per-class accuracy is the recall ``C[j, j] / sum_i C[i, j]``.
Classes with no test sample have accuracy NaN and are left out of every mean, minimum and count.

Beyond the mean of the per-class recalls, the long-tail literature reports their harmonic and
geometric means and the lowest of them ("No One Left Behind: Improving the Worst Categories in
Long-Tailed Learning", Du and Wu, CVPR 2023), macro-F1, and the many / medium / few groups (more
than 100, 100 to 20 and fewer than 20 training images by default) with each group's worst class.
"""

import math

import numpy as np

from car_tf.car.confusion import frequency_weights
from car_tf.data.longtail import FEW_BELOW, GROUPS, MANY_ABOVE, class_groups


def to_probabilities(scores):
    """Returns class probabilities: rows already on the simplex stay, anything else gets a softmax.

    The softmax is taken in float64. A row with infinite logits gets the softmax's limit (its +inf
    entries share the mass, -inf entries get none); a row holding NaN, which has none, is uniform
    (``nonfinite_logits_note`` says how many rows were either).
    """
    scores = np.asarray(scores, dtype=np.float64)
    on_simplex = np.all(scores >= 0) and np.allclose(scores.sum(axis=-1), 1.0, atol=1e-4)
    if on_simplex:
        return scores
    with np.errstate(invalid="ignore"):
        top = scores.max(axis=-1, keepdims=True)
        shifted = np.where(np.isposinf(top), np.where(np.isposinf(scores), 0.0, -np.inf), scores - top)
        exp = np.exp(shifted)
        probs = exp / exp.sum(axis=-1, keepdims=True)
    undefined = ~np.all(np.isfinite(probs), axis=-1)  # NaN logits, or every logit -inf
    probs[undefined] = 1.0 / scores.shape[-1]
    return probs


def nonfinite_logits_note(scores):
    """The report's sentence on rows of ``scores`` holding an infinite or NaN logit, or None."""
    scores = np.asarray(scores, dtype=np.float64)
    nan = np.any(np.isnan(scores), axis=-1)
    infinite = np.any(np.isinf(scores), axis=-1) & ~nan
    if not (nan.any() or infinite.any()):
        return None
    return (
        f"{int(nan.sum() + infinite.sum())} of {len(scores)} samples have non-finite logits "
        f"({int(infinite.sum())} infinite, {int(nan.sum())} NaN), as where float16 activations overflow "
        "under --mixed_precision=mixed_float16 (train with mixed_bfloat16 or none to avoid it): their "
        "probabilities, and so the ECE and the reliability diagram, take the softmax's limit for "
        "infinite logits and are uniform for NaN ones."
    )


def confusion_matrix(predictions, labels, num_classes):
    """Counts ``C[i, j]`` of samples with true class j predicted as i (rows predicted, columns true)."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (np.asarray(predictions), np.asarray(labels)), 1)
    return confusion


def per_class_accuracy(confusion):
    """Recall of every class, ``C[j, j] / sum_i C[i, j]``; NaN for a class with no test sample."""
    confusion = np.asarray(confusion, dtype=np.float64)
    support = confusion.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / support, np.nan)


def top_k_accuracy(scores, labels, k):
    """Fraction of samples whose true class is among the k highest scores (k capped at K)."""
    scores = np.asarray(scores)
    k = min(k, scores.shape[-1])
    top = np.argpartition(-scores, k - 1, axis=-1)[:, :k]
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=-1)))


def _nan_mean(values):
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def _valid(accuracy):
    accuracy = np.asarray(accuracy, dtype=np.float64)
    return accuracy[~np.isnan(accuracy)]


def group_accuracies(accuracy, train_counts, *, many_threshold=MANY_ABOVE, few_threshold=FEW_BELOW):
    """Mean per-class accuracy of the many / medium / few groups (None for an empty group).

    A class is "many" with more than ``many_threshold`` training images and "few" with fewer than
    ``few_threshold`` (car_tf.data.longtail.class_groups).
    """
    groups = class_groups(train_counts, many_threshold=many_threshold, few_threshold=few_threshold)
    return {name: _nan_mean(np.asarray(accuracy)[groups == name]) for name in GROUPS}


def group_worst_classes(accuracy, train_counts, *, many_threshold=MANY_ABOVE, few_threshold=FEW_BELOW):
    """{group: the class id of lowest accuracy in the many / medium / few group}, None for a group
    with no class that has test samples; ties go to the lowest class id."""
    accuracy = np.asarray(accuracy, dtype=np.float64)
    groups = class_groups(train_counts, many_threshold=many_threshold, few_threshold=few_threshold)
    worst = {}
    for name in GROUPS:
        members = np.flatnonzero((groups == name) & ~np.isnan(accuracy))
        worst[name] = int(members[np.argmin(accuracy[members])]) if members.size else None
    return worst


def harmonic_mean_recall(accuracy):
    """K / sum_j (1 / r_j) over the K classes with test samples; 0 when any r_j is 0.

    The harmonic mean of per-class recall (Du and Wu, CVPR 2023) is dominated by the worst classes:
    a single class that is never recognised brings it to 0 (``zero_recall_classes`` names them).
    None when no class has a test sample.
    """
    valid = _valid(accuracy)
    if not valid.size:
        return None
    if np.any(valid == 0):
        return 0.0
    return float(valid.size / np.sum(1.0 / valid))


def geometric_mean_recall(accuracy):
    """(prod_j r_j)^(1/K) over the K classes with test samples; 0 when any r_j is 0, None when K = 0."""
    valid = _valid(accuracy)
    if not valid.size:
        return None
    if np.any(valid == 0):
        return 0.0
    return float(np.exp(np.mean(np.log(valid))))


def zero_recall_classes(accuracy):
    """Ids of the classes with test samples none of which is recognised (recall exactly 0)."""
    accuracy = np.asarray(accuracy, dtype=np.float64)
    return np.flatnonzero(accuracy == 0)  # NaN compares unequal: classes without samples stay out


def per_class_precision(confusion):
    """Precision of every class, ``C[j, j] / sum_i C[j, i]`` (rows are predictions); NaN for a
    class that is never predicted."""
    confusion = np.asarray(confusion, dtype=np.float64)
    predicted = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(predicted > 0, np.diag(confusion) / predicted, np.nan)


def per_class_f1(confusion):
    """F1 of every class, 2 P_j R_j / (P_j + R_j) = 2 C[j, j] / (predicted_j + true_j).

    A class with P + R = 0 (never recognised, or never predicted) scores 0; a class with no test
    sample has F1 NaN and, as everywhere here, stays out of the means.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    predicted, true = confusion.sum(axis=1), confusion.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(true > 0, 2.0 * np.diag(confusion) / (predicted + true), np.nan)


def macro_f1(confusion):
    """Mean over the classes with test samples of their F1 (``per_class_f1``; rows predicted,
    columns true). Equals ``sklearn.metrics.f1_score(true, predicted, average="macro")`` when every
    predicted class also has test samples."""
    return _nan_mean(per_class_f1(confusion))


def worst_class_accuracy(accuracy):
    """Lowest per-class accuracy over the classes that have test samples."""
    return float(np.nanmin(accuracy))


def worst_fraction_mean(accuracy, fraction=0.1):
    """Mean accuracy of the worst ``fraction`` of classes (at least one class)."""
    valid = np.sort(np.asarray(accuracy)[~np.isnan(accuracy)])
    count = max(1, math.ceil(fraction * valid.size))
    return float(valid[:count].mean())


def off_diagonal_rates(confusion):
    """Column-normalised confusion ``P(predicted i | true j)`` with the diagonal zeroed."""
    confusion = np.asarray(confusion, dtype=np.float64)
    support = confusion.sum(axis=0)
    rates = confusion / np.maximum(support, 1.0)[None, :]
    np.fill_diagonal(rates, 0.0)
    return rates


def confusion_spectral_norm(confusion, weights=None):
    """Largest singular value of ``off_diagonal_rates(confusion) @ diag(weights)``."""
    rates = off_diagonal_rates(confusion)
    if weights is not None:
        rates = rates * np.asarray(weights, dtype=np.float64)[None, :]
    return float(np.linalg.norm(rates, ord=2))


def car_weights(train_counts, r0=0.2, count_based=False):
    """CAR's frequency weights (``car_tf.car.confusion.frequency_weights``) as a NumPy array."""
    return np.asarray(frequency_weights(np.asarray(train_counts, np.float32), r0, count_based))


def reliability_bins(probs, labels, num_bins=15):
    """Equal-width confidence bins: per bin (count, mean confidence, accuracy), empty bins zero."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == np.asarray(labels)).astype(np.float64)
    # Bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 joins the first bin.
    index = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
    count = np.bincount(index, minlength=num_bins)
    safe = np.maximum(count, 1)
    mean_confidence = np.bincount(index, confidence, minlength=num_bins) / safe
    accuracy = np.bincount(index, correct, minlength=num_bins) / safe
    return count, mean_confidence, accuracy


def expected_calibration_error(probs, labels, num_bins=15):
    """ECE = sum over bins of (bin size / N) * |accuracy - mean confidence|."""
    count, mean_confidence, accuracy = reliability_bins(probs, labels, num_bins)
    return float(np.sum(count * np.abs(accuracy - mean_confidence)) / max(count.sum(), 1))


def _validate(scores, labels, train_counts, class_names):
    if scores.ndim != 2:
        raise ValueError(f"scores have shape {scores.shape}; pass a [num_samples, num_classes] array.")
    num_classes = len(train_counts)
    if scores.shape[1] != num_classes:
        raise ValueError(
            f"the model scores {scores.shape[1]} classes but train_counts lists {num_classes}; "
            "evaluate on data with the classes the model was trained on."
        )
    if labels.shape != (scores.shape[0],):
        raise ValueError(
            f"got {labels.shape[0] if labels.ndim else 0} labels for {scores.shape[0]} score rows; "
            "pass one integer label per sample."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels span [{labels.min()}, {labels.max()}] but there are {num_classes} classes; "
            "check that the data and the model use the same class list."
        )
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(
            f"{len(class_names)} class names for {num_classes} classes; pass one name per class."
        )


def _none_if_nan(value):
    return None if value is None or math.isnan(value) else float(value)


def zero_recall_note(names):
    """The report's sentence on why the harmonic and geometric means are 0 (``names``: the
    classes of zero recall), or None when there are none."""
    if not len(names):
        return None
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    plural = "classes have" if len(names) > 1 else "class has"
    return (
        f"harmonic_mean_recall and geometric_mean_recall are 0 because {len(names)} {plural} "
        f"zero recall: {shown}."
    )


def per_class_report(
    probs_or_logits, labels, train_counts, class_names=None, r0=0.2, count_based=False, num_bins=15,
    *, many_threshold=MANY_ABOVE, few_threshold=FEW_BELOW,
):
    """All evaluation metrics for one split, as a JSON-serialisable dict.

    Args:
      probs_or_logits: [N, K] scores; rows that are not probabilities get a softmax.
      labels: [N] integer class ids in [0, K).
      train_counts: [K] training images per class (groups and CAR's frequency weights).
      class_names: optional [K] names; defaults to the class ids as strings.
      r0, count_based: frequency-weight options, as in ``car_tf.car.confusion.frequency_weights``.
      num_bins: confidence bins of the calibration error and reliability diagram.
      many_threshold, few_threshold: a class is "many" with more than ``many_threshold`` training
        images, "few" with fewer than ``few_threshold``, else "medium"; both are in the report.

    Beside top-1 and the group means the report holds ``harmonic_mean_recall`` and
    ``geometric_mean_recall`` (0 when a class has zero recall; ``notes`` then says which),
    ``macro_f1``, ``worst_class`` / ``worst_class_accuracy`` and ``group_worst``, each group's
    class of lowest recall ({"class_id", "name", "accuracy", "train_count"}, None for an empty
    group). Each per-class row adds the class's precision and F1 and whether it is its group's worst.
    It is long because it writes the report's every entry in one place, as report.json has them.
    """
    scores = np.asarray(probs_or_logits, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    train_counts = np.asarray(train_counts, dtype=np.int64)
    _validate(scores, labels, train_counts, class_names)
    num_classes = len(train_counts)
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(num_classes)]

    probs, predictions = to_probabilities(scores), scores.argmax(axis=-1)
    confusion = confusion_matrix(predictions, labels, num_classes)
    accuracy, precision, f1 = per_class_accuracy(confusion), per_class_precision(confusion), per_class_f1(confusion)
    thresholds = {"many_threshold": int(many_threshold), "few_threshold": int(few_threshold)}
    groups = class_groups(train_counts, **thresholds)
    worst = int(np.nanargmin(accuracy))
    group_worst = group_worst_classes(accuracy, train_counts, **thresholds)
    zero_recall = [names[j] for j in zero_recall_classes(accuracy)]
    bin_count, bin_confidence, bin_accuracy = reliability_bins(probs, labels, num_bins)
    test_counts = confusion.sum(axis=0)
    return {
        "num_samples": int(labels.size),
        "num_classes": num_classes,
        "top1": float(np.mean(predictions == labels)),
        "top5": top_k_accuracy(scores, labels, 5),
        "mean_class_accuracy": _nan_mean(accuracy),
        **group_accuracies(accuracy, train_counts, **thresholds),
        "group_sizes": {name: int(np.sum(groups == name)) for name in GROUPS},
        **thresholds,
        "worst_class_accuracy": worst_class_accuracy(accuracy),
        "worst_class": names[worst],
        "worst_10pct_mean": worst_fraction_mean(accuracy, 0.1),
        "group_worst": {
            name: None if j is None else _class_entry(j, names, accuracy, train_counts)
            for name, j in group_worst.items()
        },
        "harmonic_mean_recall": harmonic_mean_recall(accuracy),
        "geometric_mean_recall": geometric_mean_recall(accuracy),
        "macro_f1": macro_f1(confusion),
        "zero_recall_classes": zero_recall,
        "notes": [note for note in (zero_recall_note(zero_recall), nonfinite_logits_note(scores)) if note],
        "spectral_norm": confusion_spectral_norm(confusion),
        "weighted_spectral_norm": confusion_spectral_norm(confusion, car_weights(train_counts, r0, count_based)),
        "ece": expected_calibration_error(probs, labels, num_bins),
        "reliability": {"count": bin_count.tolist(), "confidence": bin_confidence.tolist(),
                        "accuracy": bin_accuracy.tolist()},
        "per_class": [
            {
                **_class_entry(j, names, accuracy, train_counts),
                "accuracy": _none_if_nan(accuracy[j]),
                "group": str(groups[j]),
                "test_count": int(test_counts[j]),
                "precision": _none_if_nan(precision[j]),
                "f1": _none_if_nan(f1[j]),
                "worst_in_group": group_worst[str(groups[j])] == j,
            }
            for j in range(num_classes)
        ],
    }


def _class_entry(j, names, accuracy, train_counts):
    return {"class_id": j, "name": names[j], "accuracy": float(accuracy[j]), "train_count": int(train_counts[j])}
