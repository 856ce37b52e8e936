"""absl flags shared by car_tf.train and car_tf.evaluate for choosing and reading data."""
import numpy as np
from absl import flags, logging

from car_tf.data import longtail, pipelines, sources

CIFAR_RECIPE_DATASETS = sources.CIFAR
CIFAR_IMBALANCE_FACTOR = 100.0  # CIFAR-10-LT / CIFAR-100-LT's standard profile
SMALL_IMAGE_MAX = 64  # --data_recipe=auto: images up to this side get the CIFAR recipe
SIZE_SAMPLES = 16  # images whose size decides --data_recipe=auto


def define_data_flags(flag_values=flags.FLAGS):
    """Defines the data flags once; calling it again is a no-op."""

    def define(kind, name, *args, **kwargs):
        if name not in flag_values:
            kind(name, *args, flag_values=flag_values, **kwargs)

    define(
        flags.DEFINE_enum, "dataset", "cifar10", list(sources.DATASETS),
        "Data set: cifar10 / cifar100 (made long-tailed by --imbalance_factor), imagenet_lt, "
        "places_lt, inat2018, folder (class folders under data_dir/train and data_dir/test) or "
        "list (--train_list / --test_list).",
    )
    define(
        flags.DEFINE_string, "data_dir", None,
        "Data location: CIFAR tree or .tar.gz, or the image root of the split lists; "
        f"default ${sources.DATA_DIR_ENV}, and for CIFAR then TFDS.",
    )
    define(
        flags.DEFINE_string, "train_list", None,
        "Training split list ('relative/path label' lines); default: the benchmark's usual file "
        "name inside --data_dir.",
    )
    define(
        flags.DEFINE_string, "test_list", None,
        "Test split list ('relative/path label' lines); default: the benchmark's usual file name "
        "inside --data_dir.",
    )
    define(
        flags.DEFINE_float, "imbalance_factor", None,
        "n_max / n_min of a long-tailed training subset: cifar10 / cifar100 default to "
        f"{CIFAR_IMBALANCE_FACTOR:g} (classes in index order); folder and list data are used as they "
        "are unless it is given (then classes are ranked by size, largest first); the already "
        "long-tailed benchmarks ignore it.",
        lower_bound=1.0,
    )
    define(
        flags.DEFINE_enum, "lt_profile", "exp", list(longtail.PROFILES),
        "Long-tail profile: exp (n_max * IF^(-i/(C-1))) or step (half the classes n_max, the "
        "other half n_max / IF).",
    )
    define(
        flags.DEFINE_integer, "image_size", 0,
        "Training and evaluation image side in pixels; 0 = the recipe default (cifar 32, imagenet 224).",
        lower_bound=0,
    )
    define(
        flags.DEFINE_enum, "data_recipe", "auto", ["auto", *pipelines.RECIPES],
        "Augmentation recipe: cifar (pad-4 crop + flip), imagenet (random-resized crop + flip; "
        "resize + center crop for evaluation); auto = cifar for cifar10/cifar100, for folder and "
        f"list data cifar at the images' own size when they are at most {SMALL_IMAGE_MAX} pixels, "
        "else imagenet.",
    )
    define(
        flags.DEFINE_bool, "skip_corrupt", False,
        "Leave unreadable images out (training: with a count; test: listed in report.json) "
        "instead of stopping before training.",
    )


def recipe_for(dataset, data_recipe="auto"):
    """The augmentation recipe: data_recipe, or for "auto" cifar on CIFAR and imagenet elsewhere."""
    if data_recipe != "auto":
        return data_recipe
    return "cifar" if dataset in CIFAR_RECIPE_DATASETS else "imagenet"


def datasets_from_flags(flag_values=flags.FLAGS):
    """(train LabeledData, test LabeledData, recipe, image_size) from the data flags.

    Every image file of both splits is checked before any subsampling (sources.check_images); with
    --skip_corrupt the unreadable ones are left out and listed in each split's ``skipped``.
    """
    name = flag_values.dataset
    common = dict(
        data_dir=flag_values.data_dir,
        train_list=flag_values.train_list,
        test_list=flag_values.test_list,
        check_files=True,
        skip_corrupt=flag_values.skip_corrupt,
    )
    imbalance_factor = flag_values.imbalance_factor
    if imbalance_factor is None and name in sources.CIFAR:
        imbalance_factor = CIFAR_IMBALANCE_FACTOR
    train = sources.load_dataset(
        name, "train", imbalance_factor=imbalance_factor, profile=flag_values.lt_profile, **common
    )
    test = sources.load_dataset(name, "test", **common)
    if flag_values.data_recipe == "auto" and name in ("folder", "list"):
        recipe, image_size = _recipe_from_images(train, flag_values.image_size)
    else:
        recipe = recipe_for(name, flag_values.data_recipe)
        image_size = pipelines.resolve_image_size(recipe, flag_values.image_size)
    return train, test, recipe, image_size


def _recipe_from_images(data, image_size):
    """(recipe, image size) for --data_recipe=auto from the largest side of a few training images."""
    import tensorflow as tf

    picks = np.unique(np.linspace(0, data.size - 1, min(SIZE_SAMPLES, data.size)).astype(int))
    side = max(
        max(pipelines.decode_image(tf.io.read_file(data.paths[i])).shape[:2])
        for i in picks
    )
    if side <= SMALL_IMAGE_MAX:
        recipe, image_size = "cifar", int(image_size or side)
    else:
        recipe = "imagenet"
        image_size = pipelines.resolve_image_size(recipe, image_size)
    logging.info(
        "--data_recipe=auto: the training images are up to %d pixels a side, so the %s recipe at %d "
        "pixels is used (pass --data_recipe and --image_size to choose).", side, recipe, image_size,
    )
    return recipe, image_size
