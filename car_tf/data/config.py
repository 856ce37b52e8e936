"""The data section of a run's configuration (``DataConfig``): which data set, how it is made
long-tailed, read, augmented and sampled. Its fields are the data flags of every command
(car_tf.data.flags); car_tf.training.config holds it in a run's TrainConfig."""

import dataclasses
from typing import Literal

from car_tf.data import longtail, sampling, sources
from car_tf.data.loading import CIFAR_IMBALANCE_FACTOR, SMALL_IMAGE_MAX
from car_tf.method import setting


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The data set and its pipeline (car_tf.data.loading.load_datasets)."""

    dataset: str = setting(
        "cifar10", choices="datasets",
        help="Data set: cifar10 / cifar100 (made long-tailed by --imbalance_factor), imagenet_lt, "
        "places_lt, inat2018, folder (class folders under data_dir/train and data_dir/test) or "
        "list (--train_list / --test_list).",
    )
    data_dir: str | None = setting(
        None,
        help="Data location: CIFAR tree or .tar.gz, or the image root of the split lists; "
        f"default ${sources.DATA_DIR_ENV}, and for CIFAR then TFDS.",
    )
    train_list: str | None = setting(
        None,
        help="Training split list ('relative/path label' lines); default: the benchmark's usual file "
        "name inside --data_dir.",
    )
    test_list: str | None = setting(
        None,
        help="Test split list ('relative/path label' lines); default: the benchmark's usual file name "
        "inside --data_dir.",
    )
    imbalance_factor: float | None = setting(
        None, lower_bound=1.0,
        help="n_max / n_min of a long-tailed training subset: cifar10 / cifar100 default to "
        f"{CIFAR_IMBALANCE_FACTOR:g} (classes in index order); folder and list data are used as they "
        "are unless it is given (then classes are ranked by size, largest first); the already "
        "long-tailed benchmarks ignore it.",
    )
    lt_profile: str = setting(
        "exp", choices="lt_profiles",
        help="Long-tail profile: exp (n_max * IF^(-i/(C-1))) or step (half the classes n_max, the "
        "other half n_max / IF).",
    )
    image_size: int = setting(
        0, lower_bound=0,
        help="Training and evaluation image side in pixels; 0 = the recipe default (cifar 32, imagenet 224).",
    )
    data_recipe: str = setting(
        "auto", choices="data_recipes",
        help="Augmentation recipe: cifar (pad-4 crop + flip), imagenet (random-resized crop + flip; "
        "resize + center crop for evaluation); auto = cifar for cifar10/cifar100, for folder and "
        f"list data cifar at the images' own size when they are at most {SMALL_IMAGE_MAX} pixels, "
        "else imagenet.",
    )
    skip_corrupt: bool = setting(
        False,
        help="Leave unreadable images out (training: with a count; test: listed in report.json) "
        "instead of stopping before training.",
    )
    randaugment: bool = setting(False, help="Add RandAugment (2 ops, magnitude 10) to the training stream.")
    validation_fraction: float | None = setting(
        None,
        help="Hold out this share of each class's training images (a fixed split, the same for every seed) "
        "and evaluate on it instead of the test split, which is then never read: for choosing "
        "hyper-parameters (python -m car_tf.search). Unset: train on all training images, evaluate on test.",
    )
    sampler: str = setting(
        "instance", choices="samplers",
        help="Which training images an epoch draws (Kang et al., ICLR 2020): instance (a shuffle, each image "
        "once), class_balanced (each class equally often), square_root (classes in proportion to "
        "sqrt(n_j)) or progressive (instance moving linearly to class_balanced over --epochs); the last "
        "three draw with replacement, keyed by (--seed, epoch).",
    )
    # Groups of the per-class report: many > many_threshold training images, few < few_threshold.
    many_threshold: int = setting(
        longtail.MANY_ABOVE, lower_bound=0,
        help="A class with more than this many training images is in the 'many' group of the per-class "
        "report (many / medium / few accuracy and worst class).",
    )
    few_threshold: int = setting(
        longtail.FEW_BELOW, lower_bound=0,
        help="A class with fewer than this many training images is in the 'few' group; the rest, up to "
        "--many_threshold, are 'medium'. python -m car_tf.evaluate takes both from the run's run.json "
        "unless given.",
    )

    def __post_init__(self):
        if self.validation_fraction is not None and not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                f"--validation_fraction={self.validation_fraction} must lie strictly between 0 and 1 "
                "(0.2 holds out a fifth of each class); leave it unset to evaluate on the test split."
            )
        if self.sampler not in sampling.SAMPLERS:
            raise ValueError(f"--sampler={self.sampler!r} is not known; use one of {', '.join(sampling.SAMPLERS)}.")
        longtail.check_group_thresholds(self.many_threshold, self.few_threshold)

    def group_thresholds(self):
        """{"many_threshold", "few_threshold"}: the keyword arguments of the per-class report's groups."""
        return {"many_threshold": self.many_threshold, "few_threshold": self.few_threshold}
