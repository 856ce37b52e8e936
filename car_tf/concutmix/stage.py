"""ConCutMix as a tf.data stage (Pan et al., TIP 2024, arXiv 2407.04911, steps 1-2): balanced CutMix plus two views.

``concutmix_batch_hook`` plugs this stage, with the recipe's augmentations, into
car_tf.data.train_dataset (its ``batch_hook``). By hand, with the stream's images (augmented by
the recipe) as image A::

    stream = train_dataset(train, recipe="cifar", ..., start_epoch=start, epochs=epochs)
    ds = concutmix_stage(stream, train, num_classes=10, seed=0,
                         view_augment=batch_pad_crop_flip,  # both in car_tf.data.augment;
                         partner_augment=batch_pad_crop_flip,  # or per_image(any per-image op)
                         steps_per_epoch=steps_per_epoch(train, batch_size), start_epoch=start)

The stream must run through all epochs (as train_dataset's does) rather than be re-iterated by
Keras: the epoch of a batch, which seeds it and ends the rectification warm-up, is counted from
the stream's batches.

Each output element is a dict of tensors with batch dimension B (so tf.distribute can split it):

    mixed       float32 [B, H, W, 3]  A with a box pasted from partner_augment(B)
    view1/view2 float32 [B, H, W, 3]  two independent view_augment(A), never mixed
    label_a     int32 [B]             label of A
    label_b     int32 [B]             label of the class-balanced partner B
    lam         float32 [B]           share of A's pixels (1 where not mixed), one value per batch
    mixed_flag  float32 [B]           1 where this batch was mixed, else 0
    area_label  float32 [B, K]        lam * onehot(A) + (1 - lam) * onehot(B)
    epoch       int32 [B]             the epoch the batch belongs to (drives the warm-up)

Randomness is stateless: batch i of the stream gets the seed fold_in(fold_in(key, epoch),
index in epoch), with epoch = start_epoch + i // steps_per_epoch, so a run resumed at an epoch sees
the same batches as an uninterrupted one (given a stream with the same property).
"""
import numpy as np

from car_tf.backend import import_tensorflow
from car_tf.concutmix.cutmix import area_labels, cutmix_box, paste_box
from car_tf.concutmix.released import CIFAR
from car_tf.data import augment as augment_ops
from car_tf.data import pipelines

tf = import_tensorflow(__name__)

# Sub-seeds drawn from each batch seed, in this order.
_SEED_NAMES = ("coin", "lam", "box_y", "box_x", "balanced", "view1", "view2", "partner")
# Second half of the stage's base key; the car_tf.data pipelines key their draws by (seed, 0), so
# a different value keeps the stage's draws apart from the stream's.
_STAGE_KEY = 0xC0C
# Crop scale of the contrastive views on the ImageNet recipe: their source image A is already a
# random-resized crop, so a milder crop than the recipe's (0.08, 1) is applied on top.
VIEW_CROP_SCALE = (0.2, 1.0)


def balanced_indices(labels, batch_size, seed):
    """``batch_size`` indices into ``labels``: a uniform class, then a uniform image of that class.

    ``labels`` is a concrete int array [N] (the classes sampled are those present in it); ``seed``
    a tensor [2]. Vectorised: all classes are drawn at once, then all within-class positions.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise ValueError("labels is empty; class-balanced sampling needs a labelled image.")
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    class_seed, member_seed = tf.unstack(augment_ops.split_seed(seed))
    classes = tf.random.stateless_uniform(
        [batch_size], class_seed, minval=0, maxval=len(counts), dtype=tf.int32
    )
    class_counts = tf.gather(tf.constant(counts, tf.float64), classes)
    position = tf.floor(
        tf.random.stateless_uniform([batch_size], member_seed, dtype=tf.float64) * class_counts
    )
    position = tf.cast(tf.minimum(position, class_counts - 1.0), tf.int64)
    first = tf.gather(tf.constant(starts, tf.int64), classes)
    return tf.cast(tf.gather(order, first + position), tf.int32)


def batch_seed(seed, epoch, index):
    """The seed [2] of batch ``index`` of ``epoch``: depends on (seed, epoch, index) only."""
    base = tf.stack([tf.cast(seed, tf.int64), tf.constant(_STAGE_KEY, tf.int64)])
    by_epoch = tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))
    return tf.random.experimental.stateless_fold_in(by_epoch, tf.cast(index, tf.int64))


def concutmix_batch(
    images,
    labels,
    seed,
    *,
    num_classes,
    load_balanced,
    balanced_labels,
    view_augment,
    partner_augment=None,
    cutmix_prob=CIFAR["cutmix_prob"],
):
    """The stage applied to one batch: see the module docstring for the returned dict.

    ``load_balanced(indices)`` returns the float32 images [n, H, W, 3] of the balanced source at
    ``indices``; ``balanced_labels`` is the source's concrete label array.
    """
    seeds = dict(zip(_SEED_NAMES, tf.unstack(augment_ops.split_seed(seed, len(_SEED_NAMES)))))
    images = tf.cast(images, tf.float32)
    labels = tf.cast(labels, tf.int32)
    batch_size = tf.shape(images)[0]
    height, width = tf.shape(images)[1], tf.shape(images)[2]

    partner = balanced_indices(balanced_labels, batch_size, seeds["balanced"])
    labels_b = tf.gather(tf.constant(np.asarray(balanced_labels), tf.int32), partner)
    y1, y2, x1, x2, box_lam = cutmix_box(
        height, width, seeds["lam"], seeds["box_y"], seeds["box_x"]
    )
    mixed_flag = tf.random.stateless_uniform([], seeds["coin"]) < cutmix_prob

    def paste_partners():
        # Partner images are loaded only for batches that mix (a share cutmix_prob of them).
        images_b = tf.cast(load_balanced(partner), tf.float32)
        if partner_augment is not None:
            images_b = partner_augment(images_b, seeds["partner"])
        return paste_box(images, images_b, (y1, y2, x1, x2))

    mixed = tf.cond(mixed_flag, paste_partners, lambda: images)
    lam = tf.where(mixed_flag, box_lam, 1.0)
    area_label = area_labels(labels, labels_b, lam, num_classes)

    per_example = tf.ones([batch_size], tf.float32)
    return {
        "mixed": mixed,
        "view1": tf.ensure_shape(view_augment(images, seeds["view1"]), images.shape),
        "view2": tf.ensure_shape(view_augment(images, seeds["view2"]), images.shape),
        "label_a": labels,
        "label_b": labels_b,
        "lam": lam * per_example,
        "mixed_flag": tf.cast(mixed_flag, tf.float32) * per_example,
        "area_label": area_label,
    }


def balanced_loader(balanced_source, image_size=None):
    """(load(indices) -> float32 images, labels) for an in-memory or file-backed source.

    ``balanced_source`` is a LabeledData (``labels`` plus ``images`` uint8 [N, H, W, 3] or
    ``paths``) or a pair ``(images, labels)`` of arrays. Images are resized (bilinear) to
    ``image_size`` x ``image_size`` when it is given and differs; file-backed sources need it.
    """
    if isinstance(balanced_source, (tuple, list)):
        images, labels = balanced_source
        paths = None
    else:
        images = getattr(balanced_source, "images", None)
        paths = getattr(balanced_source, "paths", None)
        labels = balanced_source.labels
    labels = np.asarray(labels).reshape(-1)
    if images is not None:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[0] != labels.shape[0] or images.shape[-1] != 3:
            raise ValueError(
                f"balanced source images have shape {images.shape} for {labels.shape[0]} labels; "
                "pass images [N, H, W, 3] with one label per image."
            )
        table = tf.constant(images)
        if image_size is None or images.shape[1:3] == (image_size, image_size):
            return (lambda indices: tf.cast(tf.gather(table, indices), tf.float32)), labels

        def load_resized(indices):
            images = tf.cast(tf.gather(table, indices), tf.float32)
            return tf.image.resize(images, [image_size, image_size], method="bilinear")

        return load_resized, labels
    if paths is None:
        raise ValueError("balanced source has neither images nor paths; give it one of the two.")
    if image_size is None:
        raise ValueError("a file-backed balanced source needs image_size; pass image_size=H.")
    path_table = tf.constant(np.asarray(paths).astype(str))

    def decode(path):  # decoded as the training stream decodes (the files were checked before training)
        raw = pipelines.decode_image(tf.io.read_file(path))
        return augment_ops.resize_to(tf.cast(raw, tf.float32), image_size)

    def load(indices):
        return tf.map_fn(
            decode,
            tf.gather(path_table, indices),
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )

    return load, labels


def concutmix_stage(
    dataset,
    balanced_source,
    *,
    num_classes,
    seed,
    view_augment,
    partner_augment=None,
    cutmix_prob=CIFAR["cutmix_prob"],
    start_epoch=0,
    steps_per_epoch=None,
    image_size=None,
    num_parallel_calls=tf.data.AUTOTUNE,
):
    """Maps a stream of (images, labels) batches to ConCutMix training dicts.

    Args:
        dataset: batches (float32 images [B, H, W, 3] in [0, 255], int labels [B]); image A.
        balanced_source: where the class-balanced partners B come from (see ``balanced_loader``);
            normally the training LabeledData itself.
        num_classes: K, the width of ``area_label``.
        seed: int; every batch's randomness derives from (seed, epoch, index in epoch).
        view_augment: batch ``augment(images, seed)`` making each contrastive view of A.
        partner_augment: batch augmentation of the partners B before mixing, normally the same as
            the stream's (None: B as loaded).
        cutmix_prob: chance that a batch is mixed (released: 0.5).
        start_epoch: the epoch of the stream's first batch (for resumed runs).
        steps_per_epoch: batches per epoch when the stream spans several epochs; None means every
            batch belongs to ``start_epoch``.
        image_size: side of B images decoded from files (file-backed sources only).
        num_parallel_calls: for the map (the output order is deterministic either way).
    Long because it threads the stream's epoch count into every batch's seed, as the module
    docstring describes.
    """
    if not 0.0 <= cutmix_prob <= 1.0:
        raise ValueError(f"cutmix_prob={cutmix_prob} is not a probability; pass a value in [0, 1].")
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be positive, or None.")
    load, labels = balanced_loader(balanced_source, image_size)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"balanced source labels span [{labels.min()}, {labels.max()}], outside "
            f"[0, {num_classes}); fix num_classes or the labels."
        )

    def stage(index, batch):
        images, batch_labels = batch
        if steps_per_epoch is None:
            epoch, in_epoch = tf.constant(start_epoch, tf.int64), index
        else:
            epoch, in_epoch = start_epoch + index // steps_per_epoch, index % steps_per_epoch
        out = concutmix_batch(
            images,
            batch_labels,
            batch_seed(seed, epoch, in_epoch),
            num_classes=num_classes,
            load_balanced=load,
            balanced_labels=labels,
            view_augment=view_augment,
            partner_augment=partner_augment,
            cutmix_prob=cutmix_prob,
        )
        out["epoch"] = tf.fill([tf.shape(images)[0]], tf.cast(epoch, tf.int32))
        return out

    return dataset.enumerate().map(stage, num_parallel_calls=num_parallel_calls, deterministic=True)


def recipe_augmentations(recipe, image_size, randaugment=None):
    """(view_augment, partner_augment) matching a car_tf.data recipe ("cifar" or "imagenet").

    Partners get the stream's own augmentation (pad-crop-flip, or random-resized crop + flip, then
    ``randaugment`` when it is a keras.layers.RandAugment). Views: pad-crop-flip on CIFAR; on
    ImageNet a random-resized crop of scale VIEW_CROP_SCALE + flip.
    """
    if recipe == "cifar":
        views = partner = augment_ops.batch_pad_crop_flip
    else:

        shape = [image_size, image_size, 3]

        def partner_one(image, seed):
            return tf.ensure_shape(augment_ops.rrc_flip(image, seed, image_size), shape)

        def view_one(image, seed):
            crop_seed, flip_seed = tf.unstack(augment_ops.split_seed(seed))
            crop = augment_ops.random_resized_crop(image, crop_seed, image_size, VIEW_CROP_SCALE)
            return tf.ensure_shape(augment_ops.random_flip(crop, flip_seed), shape)

        views, partner = augment_ops.per_image(view_one), augment_ops.per_image(partner_one)
    if not randaugment:
        return views, partner
    strong = augment_ops.per_image(lambda image, seed: augment_ops.randaugment(image, seed, randaugment))

    def partner_then_randaugment(images, seed):
        first, second = tf.unstack(augment_ops.split_seed(seed))
        return strong(partner(images, first), second)

    return views, partner_then_randaugment


def concutmix_batch_hook(data, *, recipe, image_size, seed, cutmix_prob=0.5, randaugment=False):
    """The ConCutMix stage as a ``batch_hook`` of car_tf.data.train_dataset over ``data``.

    The partners come from ``data`` itself, the augmentations from ``recipe_augmentations``
    (``randaugment``: False, True or a keras.layers.RandAugment, applied to the partners as
    train_dataset applies it to the stream)::

        hook = concutmix_batch_hook(train, recipe="cifar", image_size=32, seed=0)
        ds = train_dataset(train, recipe="cifar", image_size=32, batch_size=128, seed=0,
                           epochs=200, batch_hook=hook)
    """
    image_size = pipelines.resolve_image_size(recipe, image_size)
    if randaugment is True:
        randaugment = augment_ops.make_randaugment()
    views, partner = recipe_augmentations(recipe, image_size, randaugment)

    def hook(batches, start_epoch, steps_per_epoch):
        return concutmix_stage(
            batches,
            data,
            num_classes=data.num_classes,
            seed=seed,
            view_augment=views,
            partner_augment=partner,
            cutmix_prob=cutmix_prob,
            start_epoch=start_epoch,
            steps_per_epoch=steps_per_epoch,
            image_size=image_size,
        )

    return hook
