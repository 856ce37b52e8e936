"""Long-tailed data: class counts and groups, labelled sources, augmentation, tf.data pipelines.

``longtail`` (counts and groups) is NumPy only and serves every Keras backend; the names below
that need TensorFlow load their module on first use, so importing ``car_tf.data.longtail`` (as
the evaluation metrics do) never imports TensorFlow.
"""

import importlib

_EXPORTS = {
    "loading": ("load_datasets", "recipe_for"),
    "longtail": ("GROUPS", "class_counts", "class_groups", "longtail_counts", "subsample_longtail"),
    "pipelines": ("DEFAULT_IMAGE_SIZE", "RECIPES", "eval_dataset", "resolve_image_size",
                  "steps_per_epoch", "train_dataset"),
    "sources": ("DATASETS", "LabeledData", "load_dataset", "load_tfds", "read_image_folder",
                "read_split_list", "unpack_tarball"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'car_tf.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"car_tf.data.{_MODULE_OF[name]}"), name)
