"""Long-tailed counts, subsets, validation splits and many/medium/few groups against NumPy references."""
import math

import numpy as np
import pytest

from car_tf.data import longtail


def reference_exp_counts(n_max, num_classes, imbalance_factor):
    return [math.floor(n_max * (1.0 / imbalance_factor) ** (i / (num_classes - 1)) + 1e-9)
            for i in range(num_classes)]


def test_cifar10_lt_if100_is_5000_down_to_50():
    counts = longtail.longtail_counts(5000, 10, 100)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
    assert counts.sum() == 12406


def test_cifar100_lt_if100_total_and_groups():
    counts = longtail.longtail_counts(500, 100, 100)
    np.testing.assert_array_equal(counts, reference_exp_counts(500, 100, 100))
    assert counts.sum() == 10847
    groups = longtail.class_groups(counts)
    assert [int((groups == g).sum()) for g in longtail.GROUPS] == [35, 35, 30]


@pytest.mark.parametrize(
    "n_max, num_classes, imbalance_factor, total",
    [(500, 100, 50, 12608), (500, 100, 10, 19573), (5000, 10, 50, 13996), (5000, 10, 10, 20431)],
)
def test_published_subset_sizes(n_max, num_classes, imbalance_factor, total):
    counts = longtail.longtail_counts(n_max, num_classes, imbalance_factor)
    np.testing.assert_array_equal(counts, reference_exp_counts(n_max, num_classes, imbalance_factor))
    assert counts.sum() == total


def test_step_profile_and_edge_cases():
    np.testing.assert_array_equal(longtail.longtail_counts(5000, 10, 100, "step"), [5000] * 5 + [50] * 5)
    np.testing.assert_array_equal(longtail.longtail_counts(100, 5, 10, "step"), [100, 100, 10, 10, 10])
    np.testing.assert_array_equal(longtail.longtail_counts(7, 1, 100), [7])
    np.testing.assert_array_equal(longtail.longtail_counts(30, 4, 1), [30] * 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_max=10, num_classes=3, imbalance_factor=0.5), "at least 1"),
        (dict(n_max=10, num_classes=3, imbalance_factor=10, profile="linear"), "profile"),
        (dict(n_max=10, num_classes=3, imbalance_factor=100), "no image"),
        (dict(n_max=0, num_classes=3, imbalance_factor=10), "at least 1"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        longtail.longtail_counts(**kwargs)


def test_subsample_keeps_first_n_of_each_class_in_order():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=200)
    counts = np.array([30, 12, 5, 1])
    expected = []
    seen = np.zeros(4, int)
    for i, y in enumerate(labels):  # reference: walk in order, keep while the class has room
        if seen[y] < counts[y]:
            expected.append(i)
            seen[y] += 1
    kept = longtail.subsample_longtail(labels, counts)
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(longtail.class_counts(labels[kept], 4), counts)


def test_subsample_rejects_a_class_that_is_too_small():
    with pytest.raises(ValueError, match="Class 1 has 2 images"):
        longtail.subsample_longtail([0, 0, 0, 1, 1], [2, 3])
    with pytest.raises(ValueError, match=r"^Class 1 \('dog'\) has 2 images but the long-tailed profile asks "
                                         r"for 3; pass a larger --imbalance_factor, or leave it out"):
        longtail.subsample_longtail([0, 0, 0, 1, 1], [2, 3], ["cat", "dog"])


def test_class_counts_and_range_check():
    np.testing.assert_array_equal(longtail.class_counts([2, 0, 2, 2], 4), [1, 0, 3, 0])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        longtail.class_counts([0, 3], 3)


def test_group_boundaries():
    groups = longtail.class_groups([101, 100, 20, 19, 1, 5000])
    assert groups.tolist() == ["many", "medium", "medium", "few", "few", "many"]


def test_stratified_split_keeps_every_class_in_training():
    labels = np.repeat(np.arange(4), [100, 30, 5, 1])
    fit, val = longtail.stratified_split(labels, 0.1, seed=0)
    assert np.intersect1d(fit, val).size == 0 and fit.size + val.size == labels.size
    np.testing.assert_array_equal(np.bincount(labels[val], minlength=4), [10, 3, 0, 0])
    assert set(labels[fit]) == {0, 1, 2, 3}
    again, _ = longtail.stratified_split(labels, 0.1, seed=0)
    np.testing.assert_array_equal(again, fit)  # the same split for the same seed
