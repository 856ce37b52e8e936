"""absl flags shared by the command lines (train, evaluate, dlsa, rebalance) for choosing and reading data."""
import pathlib

from absl import flags, logging

from car_tf.data import longtail, recipes, sources
from car_tf.data.loading import CIFAR_IMBALANCE_FACTOR, SMALL_IMAGE_MAX


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
        flags.DEFINE_enum, "data_recipe", "auto", ["auto", *recipes.RECIPES],
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


def define_group_flags(flag_values=flags.FLAGS):
    """Defines --many_threshold and --few_threshold, the many / medium / few groups of the per-class
    report (train and evaluate); calling it again is a no-op."""
    if "many_threshold" not in flag_values:
        flags.DEFINE_integer(
            "many_threshold", longtail.MANY_ABOVE,
            "A class with more than this many training images is in the 'many' group of the per-class "
            "report (many / medium / few accuracy and worst class).",
            lower_bound=0, flag_values=flag_values,
        )
    if "few_threshold" not in flag_values:
        flags.DEFINE_integer(
            "few_threshold", longtail.FEW_BELOW,
            "A class with fewer than this many training images is in the 'few' group; the rest, up to "
            "--many_threshold, are 'medium'. python -m car_tf.evaluate takes both from the run's run.json "
            "unless given.",
            lower_bound=0, flag_values=flag_values,
        )


DATA_FLAGS = (
    "dataset", "data_dir", "train_list", "test_list", "imbalance_factor", "lt_profile",
    "image_size", "data_recipe", "skip_corrupt",
)


def base_run_data_flags(model_dir, given=flags.FLAGS):
    """The data flags of the run in ``model_dir`` (its flags.txt), overridden by those given on this
    command line (``given``): what a post-hoc stage on a finished run reads its data with."""
    values = flags.FlagValues()
    define_data_flags(values)
    flagfile = pathlib.Path(model_dir) / "flags.txt"
    if flagfile.is_file():
        values(["base_run", f"--flagfile={flagfile}"], known_only=True)
    else:
        values(["base_run"])
        logging.warning("%s is missing; the data flags of this command line are used.", flagfile)
    for name in DATA_FLAGS:
        if name in values and (given[name].present or not flagfile.is_file()):
            values[name].value = given[name].value
    return values
