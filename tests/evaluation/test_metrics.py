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


# --- metrics beyond top-1: recall means, macro-F1, group thresholds and each group's worst class ---


def _random_confusion(rng, num_classes, zero_recall=(), no_samples=()):
    """Counts C[i, j] (rows predicted, columns true); the classes in ``zero_recall`` are never
    recognised and those in ``no_samples`` have no test sample."""
    confusion = rng.integers(0, 6, (num_classes, num_classes)) + np.diag(rng.integers(1, 15, num_classes))
    for j in zero_recall:
        confusion[j, j] = 0
        confusion[(j + 1) % num_classes, j] += 3  # still has test samples
    for j in no_samples:
        confusion[:, j] = 0
    return confusion


def _loop_reference(confusion):
    """Recall, harmonic / geometric mean of recall and macro-F1, one class at a time."""
    num_classes = len(confusion)
    recalls, f1s = [], []
    for j in range(num_classes):
        true = sum(confusion[i][j] for i in range(num_classes))
        if true == 0:
            continue  # no test sample: left out, as everywhere in car_tf.evaluation.metrics
        predicted = sum(confusion[j][i] for i in range(num_classes))
        recall = confusion[j][j] / true
        precision = confusion[j][j] / predicted if predicted else 0.0
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0)
    if any(r == 0 for r in recalls):
        harmonic = geometric = 0.0
    else:
        harmonic = len(recalls) / sum(1 / r for r in recalls)
        product = 1.0
        for r in recalls:
            product *= r
        geometric = product ** (1 / len(recalls))
    return recalls, harmonic, geometric, sum(f1s) / len(f1s)


@pytest.mark.parametrize("zero_recall, no_samples", [((), ()), ((2,), ()), ((), (4,)), ((0, 5), (3,))])
def test_recall_means_and_macro_f1_against_loops(zero_recall, no_samples):
    rng = np.random.default_rng(len(zero_recall) + 10 * len(no_samples))
    for _ in range(5):
        confusion = _random_confusion(rng, 7, zero_recall, no_samples)
        recalls, harmonic, geometric, f1 = _loop_reference(confusion.tolist())
        accuracy = metrics.per_class_accuracy(confusion)
        assert metrics.harmonic_mean_recall(accuracy) == pytest.approx(harmonic, rel=1e-12)
        assert metrics.geometric_mean_recall(accuracy) == pytest.approx(geometric, rel=1e-12)
        assert metrics.macro_f1(confusion) == pytest.approx(f1, rel=1e-12)
        assert metrics.zero_recall_classes(accuracy).tolist() == sorted(zero_recall)
        assert metrics.worst_class_accuracy(accuracy) == pytest.approx(min(recalls))
        if zero_recall:
            assert metrics.harmonic_mean_recall(accuracy) == 0.0
        else:  # harmonic <= geometric <= arithmetic mean
            assert harmonic <= geometric <= np.mean(recalls) + 1e-12


def test_f1_conventions_and_empty_inputs():
    # Class 1 is never predicted (P undefined, R = 0): F1 0; class 2 has no test sample: left out.
    confusion = np.array([[3, 2, 0], [0, 0, 0], [1, 0, 0]])
    np.testing.assert_allclose(metrics.per_class_f1(confusion)[:2], [2 * 3 / (5 + 4), 0.0])
    assert np.isnan(metrics.per_class_f1(confusion)[2]) and np.isnan(metrics.per_class_precision(confusion)[1])
    assert metrics.macro_f1(confusion) == pytest.approx(1 / 3)
    no_class = np.array([np.nan, np.nan])
    assert metrics.harmonic_mean_recall(no_class) is None and metrics.geometric_mean_recall(no_class) is None


def test_macro_f1_matches_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for num_classes in (2, 5, 12):
        labels = rng.integers(0, num_classes, 300)
        predictions = np.where(rng.random(300) < 0.6, labels, rng.integers(0, num_classes, 300))
        predictions[predictions == num_classes - 1] = 0  # one class never predicted: F1 0
        confusion = metrics.confusion_matrix(predictions, labels, num_classes)
        expected = sklearn_metrics.f1_score(labels, predictions, labels=np.arange(num_classes), average="macro",
                                            zero_division=0)
        assert metrics.macro_f1(confusion) == pytest.approx(expected, rel=1e-12)
        assert set(labels) == set(range(num_classes))  # so sklearn's default class list is the same
        plain = sklearn_metrics.f1_score(labels, predictions, average="macro", zero_division=0)
        assert metrics.macro_f1(confusion) == pytest.approx(plain, rel=1e-12)


def test_report_says_why_the_harmonic_mean_is_zero():
    from car_tf.evaluation.report import format_table

    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    predictions = np.array([0, 0, 1, 0, 0, 1, 3, 3])  # class "c" (2) is never recognised
    report = metrics.per_class_report(np.eye(4)[predictions], labels, [300, 50, 10, 5], list("abcd"))
    assert report["harmonic_mean_recall"] == 0.0 and report["geometric_mean_recall"] == 0.0
    assert report["zero_recall_classes"] == ["c"]
    assert report["notes"] == [
        "harmonic_mean_recall and geometric_mean_recall are 0 because 1 class has zero recall: c."
    ]
    table = format_table(report)
    assert "note: harmonic_mean_recall and geometric_mean_recall are 0" in table
    assert "worst per group: many a 100.00 / medium b 50.00 / few c 0.00" in table
    assert "many > 100, few < 20 training images" in table
    # Without a class of zero recall there is nothing to note.
    fine = metrics.per_class_report(np.eye(4)[labels], labels, [300, 50, 10, 5])
    assert fine["notes"] == [] and fine["harmonic_mean_recall"] == 1.0 and "note:" not in format_table(fine)
    # A report.json written before these entries existed still prints (a finished run's stored report).
    new = ("many_threshold", "few_threshold", "harmonic_mean_recall", "group_worst", "notes")
    assert "top-1" in format_table({k: v for k, v in report.items() if k not in new})
    many = metrics.zero_recall_note([f"class{j}" for j in range(13)])
    assert "13 classes have zero recall" in many and many.endswith("class9 and 3 more.")


def test_report_holds_the_new_metrics_against_loops():
    rng = np.random.default_rng(4)
    num_classes, n = 6, 500
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[labels]
    counts = [400, 150, 90, 40, 12, 3]
    report = metrics.per_class_report(logits, labels, counts, list("abcdef"))
    predictions = logits.argmax(1)
    confusion = [[int(np.sum((predictions == i) & (labels == j))) for j in range(num_classes)]
                 for i in range(num_classes)]
    recalls, harmonic, geometric, f1 = _loop_reference(confusion)
    assert report["harmonic_mean_recall"] == pytest.approx(harmonic)
    assert report["geometric_mean_recall"] == pytest.approx(geometric)
    assert report["macro_f1"] == pytest.approx(f1)
    assert report["many_threshold"] == 100 and report["few_threshold"] == 20
    groups = {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    for group, members in groups.items():
        worst = min(members, key=lambda j: (recalls[j], j))
        assert report["group_worst"][group] == {
            "class_id": worst, "name": "abcdef"[worst], "accuracy": pytest.approx(recalls[worst]),
            "train_count": counts[worst],
        }
    flagged = [r["class_id"] for r in report["per_class"] if r["worst_in_group"]]
    assert flagged == sorted(report["group_worst"][g]["class_id"] for g in groups)
    for j, row in enumerate(report["per_class"]):
        predicted = sum(confusion[j])
        precision = confusion[j][j] / predicted
        assert row["precision"] == pytest.approx(precision)
        assert row["f1"] == pytest.approx(2 * precision * recalls[j] / (precision + recalls[j]))


def test_group_thresholds_change_membership():
    from car_tf.data import longtail

    counts = [500, 120, 100, 60, 20, 19, 8, 2]
    assert longtail.class_groups(counts).tolist() == ["many", "many", "medium", "medium", "medium", "few", "few",
                                                      "few"]
    groups = longtail.class_groups(counts, many_threshold=50, few_threshold=10)
    assert groups.tolist() == ["many", "many", "many", "many", "medium", "medium", "few", "few"]
    # few_threshold == many_threshold leaves "medium" with the classes of exactly that many images.
    assert longtail.class_groups(counts, many_threshold=20, few_threshold=20).tolist().count("medium") == 1
    accuracy = np.array([0.9, 0.7, 0.8, 0.6, 0.5, 0.4, 0.3, 0.1])
    thresholds = {"many_threshold": 50, "few_threshold": 10}
    means = metrics.group_accuracies(accuracy, counts, **thresholds)
    assert means["many"] == pytest.approx(np.mean(accuracy[:4])) and means["few"] == pytest.approx(0.2)
    assert metrics.group_worst_classes(accuracy, counts, **thresholds) == {"many": 3, "medium": 5, "few": 7}
    assert metrics.group_worst_classes(accuracy, counts) == {"many": 1, "medium": 4, "few": 7}
    accuracy[7] = np.nan  # a class without test samples is nobody's worst
    assert metrics.group_worst_classes(accuracy, counts, many_threshold=1000)["few"] == 6
    assert metrics.group_worst_classes(accuracy[:2], counts[:2])["few"] is None
    labels = np.repeat(np.arange(8), 3)
    report = metrics.per_class_report(np.eye(8)[labels], labels, counts, **thresholds)
    assert report["group_sizes"] == {"many": 4, "medium": 2, "few": 2}
    assert (report["many_threshold"], report["few_threshold"]) == (50, 10)
    assert [r["group"] for r in report["per_class"]] == groups.tolist()
    for many, few in ((10, 20), (100, -1)):
        with pytest.raises(ValueError, match=f"--few_threshold={few} and --many_threshold={many} must satisfy"):
            metrics.per_class_report(np.eye(8)[labels], labels, counts, many_threshold=many, few_threshold=few)
