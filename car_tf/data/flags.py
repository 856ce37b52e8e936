"""absl flags shared by car_tf.train and car_tf.evaluate for choosing and reading data."""
from absl import flags

from car_tf.data import longtail, pipelines, sources

CIFAR_RECIPE_DATASETS = sources.CIFAR


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
        flags.DEFINE_float, "imbalance_factor", 100.0,
        "n_max / n_min of the long-tailed training subset of cifar10, cifar100 and folder "
        "(1 keeps them balanced); the already long-tailed benchmarks ignore it.",
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
        "resize + center crop for evaluation); auto = cifar for cifar10/cifar100, else imagenet.",
    )
    define(
        flags.DEFINE_bool, "skip_corrupt", False,
        "Skip unreadable training images with a warning naming each, instead of stopping.",
    )


def recipe_for(dataset, data_recipe="auto"):
    """The augmentation recipe: data_recipe, or for "auto" cifar on CIFAR and imagenet elsewhere."""
    if data_recipe != "auto":
        return data_recipe
    return "cifar" if dataset in CIFAR_RECIPE_DATASETS else "imagenet"


def datasets_from_flags(flag_values=flags.FLAGS):
    """(train LabeledData, test LabeledData, recipe, image_size) from the data flags."""
    common = dict(
        data_dir=flag_values.data_dir,
        train_list=flag_values.train_list,
        test_list=flag_values.test_list,
    )
    train = sources.load_dataset(
        flag_values.dataset, "train", imbalance_factor=flag_values.imbalance_factor,
        profile=flag_values.lt_profile, **common,
    )
    test = sources.load_dataset(flag_values.dataset, "test", **common)
    recipe = recipe_for(flag_values.dataset, flag_values.data_recipe)
    return train, test, recipe, pipelines.resolve_image_size(recipe, flag_values.image_size)
