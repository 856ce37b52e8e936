"""Long-tailed data: class counts and groups, labelled sources, augmentation, input streams.

``longtail`` (counts, groups, validation splits), ``recipes`` and ``arrays`` (the NumPy streams)
serve every Keras backend; the names below that need TensorFlow load their module on first use,
so importing ``car_tf.data.longtail`` (as the evaluation metrics do) never imports TensorFlow.
"""

from car_tf.lazy import lazy_exports

__getattr__, __all__ = lazy_exports("car_tf.data", {
    "loading": ("load_datasets", "recipe_for"),
    "longtail": ("GROUPS", "class_counts", "class_groups", "longtail_counts", "stratified_split",
                 "subsample_longtail"),
    "recipes": ("DEFAULT_IMAGE_SIZE", "RECIPES", "resolve_image_size", "steps_per_epoch"),
    "pipelines": ("eval_dataset", "train_dataset"),
    "arrays": ("EvalBatches", "train_batches"),
    "sources": ("DATASETS", "LabeledData", "load_dataset", "load_tfds", "read_image_folder",
                "read_split_list", "unpack_tarball"),
})
