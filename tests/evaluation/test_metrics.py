"""car_tf.evaluation.metrics against hand-computed values and plain NumPy references."""

import numpy as np
import pytest

from car_tf.evaluation import metrics


def test_confusion_matrix_rows_are_predictions_columns_are_truth():
    labels = [0, 0, 1, 2, 2, 2]
    predictions = [0, 1, 1, 2, 0, 2]
    confusion = metrics.confusion_matrix(predictions, labels, 3)
    expected = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 2]])
    np.testing.assert_array_equal(confusion, expected)
    np.testing.assert_array_equal(confusion.sum(axis=0), [2, 1, 3])  # columns = test counts


def test_per_class_accuracy_is_recall_and_nan_without_samples():
    confusion = np.array([[3, 1, 0], [1, 1, 0], [0, 2, 0]])
    accuracy = metrics.per_class_accuracy(confusion)
    np.testing.assert_allclose(accuracy[:2], [3 / 4, 1 / 4])
    assert np.isnan(accuracy[2])


def test_top_k_accuracy_matches_sorting():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 12))
    labels = rng.integers(0, 12, 200)
    for k in (1, 5, 12, 20):
        ranks = np.argsort(-scores, axis=1)[:, : min(k, 12)]
        expected = np.mean([labels[i] in ranks[i] for i in range(200)])
        assert metrics.top_k_accuracy(scores, labels, k) == pytest.approx(expected)


def test_group_worst_and_worst_fraction():
    accuracy = np.array([0.9, 0.8, 0.5, np.nan, 0.1, 0.3] + [1.0] * 14)
    counts = [500, 200, 50, 30, 5, 3] + [150] * 14
    groups = metrics.group_accuracies(accuracy, counts)
    assert groups["many"] == pytest.approx((0.9 + 0.8 + 14) / 16)
    assert groups["medium"] == pytest.approx(0.5)  # the NaN class is left out
    assert groups["few"] == pytest.approx(0.2)
    assert metrics.group_accuracies(accuracy[:2], [500, 200])["few"] is None
    assert metrics.worst_class_accuracy(accuracy) == pytest.approx(0.1)
    # 19 valid classes -> ceil(1.9) = 2 worst: 0.1 and 0.3.
    assert metrics.worst_fraction_mean(accuracy, 0.1) == pytest.approx(0.2)


def test_spectral_norm_hand_example():
    confusion = np.array([[8, 1], [2, 9]])
    # Column-normalised, diagonal zeroed: [[0, 0.1], [0.2, 0]] -> singular values 0.2 and 0.1.
    np.testing.assert_allclose(metrics.off_diagonal_rates(confusion), [[0, 0.1], [0.2, 0]])
    assert metrics.confusion_spectral_norm(confusion) == pytest.approx(0.2)
    assert metrics.confusion_spectral_norm(confusion, [1.0, 3.0]) == pytest.approx(0.3)


def test_car_weights_and_weighted_norm_match_numpy():
    rng = np.random.default_rng(1)
    counts = np.array([5000, 1200, 300, 80, 20, 5])
    for count_based, r0 in ((False, 0.2), (True, 0.5)):
        m = counts if count_based else counts / counts.sum()
        w = 1.0 / np.sqrt(m + r0)
        w = np.maximum(w / w.mean(), 1e-3)
        np.testing.assert_allclose(metrics.car_weights(counts, r0, count_based), w, rtol=1e-5)
    confusion = rng.integers(0, 20, (6, 6))
    rates = confusion / confusion.sum(0, keepdims=True)
    np.fill_diagonal(rates, 0)
    w = metrics.car_weights(counts)
    expected = np.linalg.svd(rates * w[None, :], compute_uv=False)[0]
    assert metrics.confusion_spectral_norm(confusion, w) == pytest.approx(expected, rel=1e-6)


def test_expected_calibration_error_hand_example():
    # Confidences 0.95 (right), 0.95 (wrong), 0.5 (right), 0.3333 (right) over 15 bins.
    probs = np.array([[0.95, 0.05, 0], [0.95, 0.05, 0], [0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    labels = np.array([0, 1, 0, 0])
    # Bins: {0.95, 0.95} acc 0.5 -> |0.5 - 0.95|; {0.5} acc 1 -> 0.5; {1/3} acc 1 -> 2/3.
    expected = (2 * 0.45 + 0.5 + 2 / 3) / 4
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(expected)
    count, _, _ = metrics.reliability_bins(probs, labels)
    assert count.sum() == 4 and count[14] == 2 and count[7] == 1 and count[4] == 1


def test_to_probabilities_softmaxes_logits_only():
    probs = np.array([[0.2, 0.8], [0.5, 0.5]])
    np.testing.assert_allclose(metrics.to_probabilities(probs), probs)
    logits = np.array([[1000.0, 0.0], [0.0, np.log(3.0)]])
    np.testing.assert_allclose(metrics.to_probabilities(logits), [[1, 0], [0.25, 0.75]])


def test_per_class_report_against_loops():
    rng = np.random.default_rng(2)
    num_classes, n = 5, 400
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes)) + 2.0 * np.eye(num_classes)[labels]
    counts = [300, 120, 60, 25, 8]
    report = metrics.per_class_report(logits, labels, counts, list("abcde"))
    predictions = logits.argmax(1)
    per_class = [np.mean(predictions[labels == j] == j) for j in range(num_classes)]
    assert report["top1"] == pytest.approx(np.mean(predictions == labels))
    assert [r["accuracy"] for r in report["per_class"]] == pytest.approx(per_class)
    assert report["many"] == pytest.approx(np.mean(per_class[:2]))
    assert report["medium"] == pytest.approx(np.mean(per_class[2:4]))
    assert report["few"] == pytest.approx(per_class[4])
    assert report["worst_class_accuracy"] == pytest.approx(min(per_class))
    assert report["worst_class"] == "abcde"[int(np.argmin(per_class))]
    assert report["group_sizes"] == {"many": 2, "medium": 2, "few": 1}
    assert report["top5"] == 1.0 and report["num_samples"] == n
    assert sum(r["test_count"] for r in report["per_class"]) == n
    assert 0 < report["spectral_norm"] < 1 and 0 <= report["ece"] <= 1


@pytest.mark.parametrize(
    "scores, labels, counts, names, message",
    [
        (np.zeros((4, 3)), [0, 1, 2, 0], [5, 5], None, "scores 3 classes"),
        (np.zeros((4, 3)), [0, 1, 2, 3], [5, 5, 5], None, "labels span"),
        (np.zeros((4, 3)), [0, 1, 2], [5, 5, 5], None, "labels for 4"),
        (np.zeros((4, 3)), [0, 1, 2, 0], [5, 5, 5], ["a"], "class names"),
    ],
)
def test_per_class_report_rejects_inconsistent_inputs(scores, labels, counts, names, message):
    with pytest.raises(ValueError, match=message):
        metrics.per_class_report(scores, labels, counts, names)
