"""Loading a data set's splits as the configuration describes (car_tf.data.config.DataConfig;
the command lines build one from their flags with car_tf.data.flags)."""
import dataclasses

import numpy as np
from absl import logging

from car_tf.data import longtail, recipes, sources

CIFAR_RECIPE_DATASETS = sources.CIFAR
CIFAR_IMBALANCE_FACTOR = 100.0  # CIFAR-10-LT / CIFAR-100-LT's standard profile
SMALL_IMAGE_MAX = 64  # --data_recipe=auto: images up to this side get the CIFAR recipe
SIZE_SAMPLES = 16  # images whose size decides --data_recipe=auto
VALIDATION_SEED = 0  # the held-out images do not depend on the run's --seed: every run sees the same split


def recipe_for(dataset, data_recipe="auto"):
    """The augmentation recipe: data_recipe, or for "auto" cifar on CIFAR and imagenet elsewhere."""
    if data_recipe != "auto":
        return data_recipe
    return "cifar" if dataset in CIFAR_RECIPE_DATASETS else "imagenet"


def load_datasets(config):
    """(train LabeledData, evaluation LabeledData, recipe, image_size) from ``config``, a DataConfig.

    The evaluation split is the test split, or with ``validation_fraction`` a stratified share of
    each class's (long-tailed) training images, held out from training; the test split is then not
    read at all, so nothing chosen on that split has seen it. Every image file is checked before any
    subsampling (sources.check_images); with --skip_corrupt the unreadable ones are left out and
    listed in each split's ``skipped``.
    """
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"load_datasets takes a DataConfig (car_tf.data.config), not {type(config).__name__}; "
                        "a command line builds one with car_tf.data.flags.data_config(FLAGS).")
    name = config.dataset
    common = dict(
        data_dir=config.data_dir,
        train_list=config.train_list,
        test_list=config.test_list,
        check_files=True,
        skip_corrupt=config.skip_corrupt,
    )
    imbalance_factor = config.imbalance_factor
    if imbalance_factor is None and name in sources.CIFAR:
        imbalance_factor = CIFAR_IMBALANCE_FACTOR
    train = sources.load_dataset(
        name, "train", imbalance_factor=imbalance_factor, profile=config.lt_profile, **common
    )
    fraction = config.validation_fraction
    if fraction:
        fit, held_out = longtail.stratified_split(train.labels, fraction, VALIDATION_SEED)
        train, test = train.subset(fit), dataclasses.replace(train.subset(held_out), skipped=())
    else:
        test = sources.load_dataset(name, "test", **common)
    if config.data_recipe == "auto" and name in ("folder", "list"):
        recipe, image_size = _recipe_from_images(train, config.image_size)
    else:
        recipe = recipe_for(name, config.data_recipe)
        image_size = recipes.resolve_image_size(recipe, config.image_size)
    return train, test, recipe, image_size


def _recipe_from_images(data, image_size):
    """(recipe, image size) for --data_recipe=auto from the largest side of a few training images."""
    from PIL import Image  # reads the size from the file's header, without decoding it

    picks = np.unique(np.linspace(0, data.size - 1, min(SIZE_SAMPLES, data.size)).astype(int))
    side = 0
    for i in picks:
        try:
            with Image.open(data.paths[i]) as image:
                side = max(side, *image.size)
        except Exception as error:  # PIL's OSError, DecompressionBombError, SyntaxError, ...
            reason = next((l.strip() for l in str(error).splitlines() if l.strip()), type(error).__name__)
            raise ValueError(
                f"The training image {data.paths[i]} cannot be opened to choose --data_recipe=auto "
                f"({reason[:200]}); replace or remove it, or pass --data_recipe and --image_size."
            ) from None
    if side <= SMALL_IMAGE_MAX:
        recipe, image_size = "cifar", int(image_size or side)
    else:
        recipe = "imagenet"
        image_size = recipes.resolve_image_size(recipe, image_size)
    logging.info(
        "--data_recipe=auto: the training images are up to %d pixels a side, so the %s recipe at %d "
        "pixels is used (pass --data_recipe and --image_size to choose).", side, recipe, image_size,
    )
    return recipe, image_size
