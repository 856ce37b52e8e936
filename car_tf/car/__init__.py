"""CAR, the Confusion-Aware Spectral Regularizer (README, "CAR in your own Keras code").

``confusion`` (surrogate, weights, column-wise EMA) and ``spectral`` (sigma_max) are pure
functions of tensors; ``state`` holds CARState (``sparse_state`` its sparse form for very
large label spaces), ``carrier`` the models that carry it and ``attach_car_state``, ``loss``
CARLoss, ``callback`` CARCallback, and ``method`` tells the trainer what CAR needs.
"""
from car_tf.car.callback import CARCallback
from car_tf.car.carrier import attach_car_state
from car_tf.car.loss import CARLoss
from car_tf.car.sparse_state import SparseCARState
from car_tf.car.state import CARState

__all__ = ["CARCallback", "CARLoss", "CARState", "SparseCARState", "attach_car_state"]
