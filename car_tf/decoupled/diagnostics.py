"""Per-group view of the decoupled logit |w_c| |x| cos(theta_c).

For each training-count group (many > 100 images, medium 20..100, few < 20) it measures the mean
norm of the raw classifier columns w_c of the group's classes, the mean feature norm |x| of the
samples whose label is in the group, and their mean target cosine cos(x, w_y). Long-tailed training
typically leaves all three lower for the few-shot group; the decoupled loss's terms target them.
"""

import keras
import numpy as np

from car_tf.data.longtail import GROUPS, class_groups
from car_tf.losses.cross_entropy import class_ids
from car_tf.models.registry import features_model, inference_model


def _feature_extractor(model):
    """A compiled function mapping images to the output of ``model``'s "features" layer (that of
    its image network inside a training wrapper such as ConCutMix's)."""
    from car_tf.backend import compiled_inference

    return compiled_inference(features_model(inference_model(model), with_logits=False))


def decoupled_quantities(model, dataset, class_counts, extractor=None):
    """{group: {"classifier_norm", "feature_norm", "target_cosine"}} over ``dataset``.

    ``dataset`` yields (images, labels, ...) batches; labels are int ids or soft rows (argmax).
    Groups without classes are left out; a group with classes but no samples in ``dataset`` has
    NaN feature norm and cosine. ``extractor`` (images -> features) is built from the model's
    "features" layer when not given.
    """
    counts = np.asarray(class_counts)
    model = inference_model(model)  # a training wrapper's image network
    kernel = np.asarray(keras.ops.convert_to_numpy(model.get_layer("classifier").kernel))
    if kernel.ndim != 2 or kernel.shape[1] != counts.size:
        raise ValueError(
            f"the classifier kernel has shape {kernel.shape} but there are {counts.size} class "
            "counts; pass one count per class of the model's output."
        )
    extractor = extractor or _feature_extractor(model)
    column_norms = np.linalg.norm(kernel, axis=0)
    unit_columns = kernel / np.maximum(column_norms, 1e-12)
    norm_sum = np.zeros(counts.size)
    cosine_sum = np.zeros(counts.size)
    samples = np.zeros(counts.size)
    for batch in dataset:
        labels = class_ids(batch[1])
        if labels.size and (labels.min() < 0 or labels.max() >= counts.size):
            raise ValueError(
                f"a label lies outside [0, {counts.size}); check the data set's labels and the "
                "class counts."
            )
        features = np.asarray(extractor(batch[0]), dtype=np.float64)
        norms = np.linalg.norm(features, axis=-1)
        cosines = np.sum(features * unit_columns[:, labels].T, axis=-1) / np.maximum(norms, 1e-12)
        norm_sum += np.bincount(labels, norms, counts.size)
        cosine_sum += np.bincount(labels, cosines, counts.size)
        samples += np.bincount(labels, minlength=counts.size)
    groups = class_groups(counts)
    result = {}
    for group in GROUPS:
        members = groups == group
        if not members.any():
            continue
        seen = samples[members].sum()
        result[group] = {
            "classifier_norm": float(column_norms[members].mean()),
            "feature_norm": float(norm_sum[members].sum() / seen) if seen else float("nan"),
            "target_cosine": float(cosine_sum[members].sum() / seen) if seen else float("nan"),
        }
    return result


class DecoupledDiagnostics(keras.callbacks.Callback):
    """Adds decoupled_quantities to the epoch logs as "<prefix>/<group>/<quantity>".

    History and later callbacks see the keys; list this callback before TensorBoard so the
    TensorBoard callback writes them too.

    Args:
        dataset: finite tf.data.Dataset of (images, labels) batches, e.g. the test split.
        class_counts: training images per class, which defines the groups.
        prefix: first part of every log key.
    """

    def __init__(self, dataset, class_counts, prefix="dec"):
        super().__init__()
        self.dataset = dataset
        self.class_counts = np.asarray(class_counts)
        self.prefix = prefix
        self._extractor = None
        self._extractor_model = None

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if self._extractor_model is not self.model:
            self._extractor = _feature_extractor(self.model)
            self._extractor_model = self.model
        quantities = decoupled_quantities(
            self.model, self.dataset, self.class_counts, self._extractor
        )
        for group, values in quantities.items():
            for name, value in values.items():
                logs[f"{self.prefix}/{group}/{name}"] = value
