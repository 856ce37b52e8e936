"""CutMix as ConCutMix uses it (Pan et al., TIP 2024, step 2): one box for the whole batch,
the partner pasted into it, and the area label. Pure functions of tensors (TensorFlow)."""

from car_tf.backend import import_tensorflow

tf = import_tensorflow(__name__)


def cutmix_box(height, width, lam_seed, y_seed, x_seed):
    """One CutMix box for the whole batch: (y1, y2, x1, x2, lam) with lam from the clipped area.

    lam0 ~ U(0, 1); a box of sides floor(side * sqrt(1 - lam0)) around a uniform centre, clipped
    to the image; lam = 1 - box area / image area.
    """
    lam0 = tf.random.stateless_uniform([], lam_seed)
    ratio = tf.sqrt(1.0 - lam0)
    cut_h = tf.cast(tf.cast(height, tf.float32) * ratio, tf.int32)
    cut_w = tf.cast(tf.cast(width, tf.float32) * ratio, tf.int32)
    cy = tf.random.stateless_uniform([], y_seed, minval=0, maxval=height, dtype=tf.int32)
    cx = tf.random.stateless_uniform([], x_seed, minval=0, maxval=width, dtype=tf.int32)
    y1 = tf.clip_by_value(cy - cut_h // 2, 0, height)
    y2 = tf.clip_by_value(cy + cut_h // 2, 0, height)
    x1 = tf.clip_by_value(cx - cut_w // 2, 0, width)
    x2 = tf.clip_by_value(cx + cut_w // 2, 0, width)
    area = tf.cast((y2 - y1) * (x2 - x1), tf.float32)
    lam = 1.0 - area / tf.cast(height * width, tf.float32)
    return y1, y2, x1, x2, lam


def paste_box(images, partners, box):
    """``images`` [B, H, W, 3] with the box (y1, y2, x1, x2) taken from ``partners`` (same shape)."""
    y1, y2, x1, x2 = box
    rows = tf.concat([images[:, y1:y2, :x1], partners[:, y1:y2, x1:x2], images[:, y1:y2, x2:]], axis=2)
    return tf.ensure_shape(tf.concat([images[:, :y1], rows, images[:, y2:]], axis=1), images.shape)


def area_labels(labels_a, labels_b, lam, num_classes):
    """lam * onehot(A) + (1 - lam) * onehot(B): the label of images holding a share lam of A."""
    return lam * tf.one_hot(labels_a, num_classes) + (1.0 - lam) * tf.one_hot(labels_b, num_classes)
