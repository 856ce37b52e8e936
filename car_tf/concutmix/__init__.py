"""ConCutMix (Pan et al., TIP 2024): class-balanced CutMix with rectified labels, plus BCL.

Pieces: ``concutmix_stage`` (tf.data; ``concutmix_batch_hook`` plugs it into the car_tf
training stream), the box and area label in ``cutmix``, the pure label functions in ``rectification``,
``balanced_contrastive_loss``, ``ConCutMixModel`` (the train step) and the released
hyperparameters per data set in ``CONCUTMIX_DEFAULTS``.
"""
from car_tf.lazy import lazy_exports

__getattr__, __all__ = lazy_exports("car_tf.concutmix", {  # the model and the stage need TensorFlow
    "contrastive": ("balanced_contrastive_loss",),
    "model": ("ConCutMixModel",),
    "rectification": ("class_prototypes", "rectification_weight", "rectify", "semantic_label"),
    "stage": ("balanced_indices", "concutmix_batch_hook", "concutmix_stage"),
})
from car_tf.concutmix.released import CONCUTMIX_DEFAULTS  # noqa: E402  (pure data: no TensorFlow)

__all__ = [*__all__, "CONCUTMIX_DEFAULTS"]
