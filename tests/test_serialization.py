"""Every Keras object car_tf registers goes through the shared round-trip checks (keras_roundtrip.py).

The table below holds a small instance and inputs for each registered class; a class registered
without a row here fails ``test_every_registered_class_has_a_roundtrip``, so a new layer, loss or
model gets its serialization, .keras save / load and (for layers) mixed-precision checks by
adding one row.
"""

import inspect

import keras
import numpy as np
import pytest

import car_tf
import car_tf.concutmix  # noqa: F401  (registers ConCutMixModel)
import car_tf.decoupled  # noqa: F401
import car_tf.dlsa  # noqa: F401
from car_tf.car.carrier import attach_car_state
from car_tf.car.state import CARState
from car_tf.concutmix.model import ConCutMixModel
from car_tf.decoupled.margin import DecoupledMarginLoss
from car_tf.decoupled.terms import FeatureNormPenalty, UniformityRegularizer
from car_tf.dlsa.classifiers import StageClassifier
from car_tf.dlsa.flow import MADE, FlowBatchNormalization, MaskedAutoregressiveFlow
from car_tf.dlsa.routed_classifier import DLSARoutedClassifier
from car_tf.losses import CrossEntropy, LDAMLoss, LogitAdjustedLoss
from car_tf.models import CosineClassifier, PixelNormalization, create_model
from car_tf.models.resnet import GroupedConv2D
from car_tf.models.resnet_cifar import ZeroPadShortcut
from car_tf.models.vit import ClassTokenPositionEmbedding
from car_tf.training.optimizers import FineTuningAdamW, FineTuningSGD
from car_tf.training.schedules import WarmupSchedule

from keras_roundtrip import assert_mixed_precision, assert_serialization_roundtrip

RNG = np.random.default_rng(0)
COUNTS = [40, 12, 5]


def array(*shape, low=-1.0, high=1.0):
    return RNG.uniform(low, high, size=shape).astype("float32")


LABELS = np.array([0, 1, 2, 1], "int32")


def car_functional():
    model = create_model("resnet32", 3, input_shape=(8, 8, 3))
    attach_car_state(model, car_tf.CARLoss(COUNTS))
    return model


def car_sequential():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    attach_car_state(model, car_tf.CARLoss(COUNTS))
    return model


def concutmix_model():
    return ConCutMixModel(create_model("resnet32", 3, input_shape=(8, 8, 3)), 3, COUNTS, projection_dim=4)


def routed_classifier():
    model = DLSARoutedClassifier(3, 4, depth=1, flow_config={"num_components": 5})
    model.build((None, 4))
    return model


# registered name -> (factory, inputs or None, mixed-precision check for a layer)
ROWS = {
    "CARLoss": (lambda: car_tf.CARLoss(COUNTS, base="logit_adjusted", spec_lambda=0.5), None, False),
    "CARState": (lambda: CARState(3, spec_lambda=0.2), (array(2, 3),), False),
    "SparseCARState": (lambda: car_tf.SparseCARState(3, 2, spec_lambda=0.2), (array(2, 3),), False),
    "CARFunctional": (car_functional, (array(2, 8, 8, 3, low=0, high=255),), False),
    "CARSequential": (car_sequential, (array(2, 4),), False),
    "ConCutMixModel": (concutmix_model, (array(2, 8, 8, 3, low=0, high=255),), False),
    "CrossEntropy": (lambda: CrossEntropy(label_smoothing=0.1), (LABELS, array(4, 3)), False),
    "LDAMLoss": (lambda: LDAMLoss(COUNTS, max_margin=0.4), (LABELS[:3], array(3, 3)), False),
    "LogitAdjustedLoss": (lambda: LogitAdjustedLoss(COUNTS, tau=0.5), (LABELS, array(4, 3)), False),
    "DecoupledMarginLoss": (lambda: DecoupledMarginLoss(scale=16.0, margin=0.1), (LABELS, array(4, 3)), False),
    "UniformityRegularizer": (lambda: UniformityRegularizer(0.2), (array(5, 3),), False),
    "FeatureNormPenalty": (lambda: FeatureNormPenalty(0.1, 2.0), (array(2, 5),), True),
    "CosineClassifier": (lambda: CosineClassifier(3, scale=10.0), (array(2, 5),), False),
    "PixelNormalization": (
        lambda: PixelNormalization((0.4, 0.5, 0.6), (0.2, 0.2, 0.3), channel_order="bgr"),
        (array(2, 4, 4, 3, low=0, high=255),),
        True,
    ),
    "GroupedConv2D": (lambda: GroupedConv2D(4, 3, groups=2, padding="same"), (array(2, 5, 5, 4),), True),
    "ZeroPadShortcut": (lambda: ZeroPadShortcut(6), (array(2, 4, 4, 3),), True),
    "ClassTokenPositionEmbedding": (lambda: ClassTokenPositionEmbedding(), (array(2, 4, 6),), True),
    "MADE": (lambda: MADE(hidden_units=6, seed=1), (array(3, 4),), False),
    "FlowBatchNormalization": (lambda: FlowBatchNormalization(), (array(3, 4),), False),
    "MaskedAutoregressiveFlow": (lambda: MaskedAutoregressiveFlow(num_components=5, hidden_units=6), (array(3, 4),), False),
    "StageClassifier": (lambda: StageClassifier(3), ([array(2, 4), array(2, 5)],), False),
    "DLSARoutedClassifier": (routed_classifier, (array(3, 4),), False),
    "WarmupSchedule": (lambda: WarmupSchedule(0.1, 100, warmup_steps=10, decay_steps=[50]), (np.float32(60),), False),
    "FineTuningSGD": (lambda: FineTuningSGD(0.1, backbone_variables=["a/kernel"], freeze_steps=3), None, False),
    "FineTuningAdamW": (lambda: FineTuningAdamW(1e-3, backbone_lr_multiplier=0.1, weight_decay=0.05), None, False),
}


def registered_classes():
    return {
        name.split(">", 1)[1]: obj
        for name, obj in keras.saving.get_custom_objects().items()
        if name.startswith("car_tf>") and inspect.isclass(obj)
    }


def test_every_registered_class_has_a_roundtrip():
    missing = sorted(set(registered_classes()) - set(ROWS))
    assert not missing, f"add a row to ROWS for {missing}"


@pytest.mark.parametrize("name", sorted(ROWS))
def test_roundtrip(name):
    factory, inputs, mixed = ROWS[name]
    obj = factory()
    assert type(obj) is registered_classes()[name]
    if isinstance(obj, keras.optimizers.Optimizer):
        revived = keras.optimizers.deserialize(keras.optimizers.serialize(obj))
        assert type(revived) is type(obj) and revived.get_config() == obj.get_config()
        return
    if isinstance(obj, keras.Model) and hasattr(obj, "car_state") and name != "ConCutMixModel":
        loaded = _saved_and_loaded(obj)
        assert loaded.car_state.num_classes == obj.car_state.num_classes
    assert_serialization_roundtrip(obj, inputs, atol=1e-5)
    if mixed:
        assert_mixed_precision(factory, inputs[0])


def _saved_and_loaded(model):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/m.keras"
        model.save(path)
        return keras.saving.load_model(path)
