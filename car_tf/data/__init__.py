"""Long-tailed data: class counts and groups, labelled sources, augmentation, tf.data pipelines."""
from car_tf.data.loading import load_datasets, recipe_for
from car_tf.data.longtail import (
    GROUPS,
    class_counts,
    class_groups,
    longtail_counts,
    subsample_longtail,
)
from car_tf.data.pipelines import (
    DEFAULT_IMAGE_SIZE,
    RECIPES,
    eval_dataset,
    resolve_image_size,
    steps_per_epoch,
    train_dataset,
)
from car_tf.data.sources import (
    DATASETS,
    LabeledData,
    load_dataset,
    load_tfds,
    read_image_folder,
    read_split_list,
    unpack_tarball,
)

__all__ = [
    "DATASETS",
    "DEFAULT_IMAGE_SIZE",
    "GROUPS",
    "LabeledData",
    "RECIPES",
    "class_counts",
    "class_groups",
    "eval_dataset",
    "load_datasets",
    "load_dataset",
    "load_tfds",
    "longtail_counts",
    "read_image_folder",
    "read_split_list",
    "recipe_for",
    "resolve_image_size",
    "steps_per_epoch",
    "subsample_longtail",
    "train_dataset",
    "unpack_tarball",
]
