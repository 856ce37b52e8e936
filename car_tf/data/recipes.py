"""Augmentation recipes, their image sizes and the steps of an epoch: shared by every input stream (pure)."""

CIFAR_PAD = 4  # the CIFAR recipe pads by this many pixels before its random crop
RECIPES = ("cifar", "imagenet")
DEFAULT_IMAGE_SIZE = {"cifar": 32, "imagenet": 224}


def steps_per_epoch(data, batch_size):
    """Number of full batches in one epoch (the remainder is dropped)."""
    if batch_size < 1 or data.size < batch_size:
        raise ValueError(
            f"batch_size={batch_size} does not fit {data.size} training images; "
            "use a batch size between 1 and the number of images."
        )
    return data.size // batch_size


def resolve_image_size(recipe, image_size):
    """image_size, or the recipe's default (32 for cifar, 224 for imagenet) when it is 0 or None."""
    if recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}; use one of {RECIPES}.")
    return int(image_size) if image_size else DEFAULT_IMAGE_SIZE[recipe]
