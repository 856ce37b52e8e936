"""Long-tailed class counts, subsets, stratified validation splits and many/medium/few groups (pure NumPy)."""
import numpy as np

GROUPS = ("many", "medium", "few")
PROFILES = ("exp", "step")
MANY_ABOVE = 100  # a class with more than this many training images is "many"
FEW_BELOW = 20  # a class with fewer than this many training images is "few"


def longtail_counts(n_max, num_classes, imbalance_factor, profile="exp"):
    """Per-class image counts of a long-tailed subset, head class first.

    exp:  n_i = floor(n_max * IF^(-i / (C - 1))), i = 0..C-1 (CIFAR-10-LT IF 100: 5000 ... 50).
    step: the first C // 2 classes keep n_max images, the rest floor(n_max / IF).
    """
    if int(n_max) < 1 or int(num_classes) < 1:
        raise ValueError(
            f"n_max={n_max} and num_classes={num_classes} must both be at least 1; pass positive values."
        )
    if not imbalance_factor >= 1:
        raise ValueError(
            f"imbalance_factor={imbalance_factor} must be at least 1 (1 keeps the set balanced)."
        )
    if profile not in PROFILES:
        raise ValueError(f"Unknown long-tail profile {profile!r}; use one of {PROFILES}.")
    n_max, num_classes = int(n_max), int(num_classes)
    if profile == "exp":
        exponents = np.arange(num_classes) / max(num_classes - 1, 1)
        raw = n_max * np.power(float(imbalance_factor), -exponents)
    else:
        raw = np.full(num_classes, n_max / float(imbalance_factor))
        raw[: num_classes // 2] = n_max
    # The tolerance keeps exact products such as 5000 * 100^-1 = 50 from flooring to 49.
    counts = np.floor(raw + 1e-9).astype(np.int64)
    if counts.min() < 1:
        raise ValueError(
            f"imbalance_factor={imbalance_factor} leaves the tail classes with no image "
            f"(n_max={n_max}); use an imbalance factor of at most {n_max}."
        )
    return counts


def class_counts(labels, num_classes):
    """Number of samples of each class, int64 [num_classes]."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"Labels must lie in [0, {num_classes}); found {labels.min()}..{labels.max()}: "
            "check the label list or the number of classes."
        )
    return np.bincount(labels.astype(np.int64), minlength=num_classes).astype(np.int64)


def subsample_longtail(labels, counts, class_names=None):
    """Indices (ascending) keeping the first counts[c] samples of each class c in the given order."""
    labels = np.asarray(labels).astype(np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    available = class_counts(labels, len(counts))
    short = np.flatnonzero(available < counts)
    if short.size:
        c = short[0]
        name = f" ({class_names[c]!r})" if class_names is not None else ""
        raise ValueError(
            f"Class {c}{name} has {available[c]} images but the long-tailed profile asks for "
            f"{counts[c]}; pass a larger --imbalance_factor, or leave it out to use the data as it is."
        )
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(len(counts)))
    rank = np.empty_like(labels)
    rank[order] = np.arange(labels.size) - starts[labels[order]]
    return np.flatnonzero(rank < counts[labels])


def stratified_split(labels, fraction, seed=0):
    """(fit indices, validation indices): round(fraction * n_c) samples of each class go to
    validation, at most n_c - 1, so every class keeps a training sample."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction={fraction} must lie in [0, 1); try 0.1.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    validation = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        take = min(int(round(fraction * members.size)), members.size - 1)
        validation.append(members[:take])
    validation = np.sort(np.concatenate(validation)).astype(np.int64)
    fit = np.setdiff1d(np.arange(labels.size), validation)
    return fit, validation


def check_group_thresholds(many_threshold, few_threshold):
    """Raises a ValueError unless 0 <= few_threshold <= many_threshold."""
    if not 0 <= few_threshold <= many_threshold:
        raise ValueError(
            f"--few_threshold={few_threshold} and --many_threshold={many_threshold} must satisfy "
            "0 <= few_threshold <= many_threshold (a class with more than many_threshold training "
            f"images is many, one with fewer than few_threshold few; defaults {MANY_ABOVE} and {FEW_BELOW})."
        )


def class_groups(counts, *, many_threshold=MANY_ABOVE, few_threshold=FEW_BELOW):
    """"many" (> many_threshold training images), "medium" (few_threshold..many_threshold) or
    "few" (< few_threshold) for each class; the defaults 100 and 20 are the usual ImageNet-LT split."""
    check_group_thresholds(many_threshold, few_threshold)
    counts = np.asarray(counts)
    return np.where(
        counts > many_threshold, GROUPS[0], np.where(counts >= few_threshold, GROUPS[1], GROUPS[2])
    )
