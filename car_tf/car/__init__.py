"""CAR, the Confusion-Aware Spectral Regularizer (README, "CAR in your own Keras code").

``confusion`` (surrogate, weights, column-wise EMA) and ``spectral`` (sigma_max) are pure
functions of tensors; ``state`` holds CARState, ``loss`` CARLoss, ``callback`` CARCallback, and
``method`` tells the trainer what CAR needs.
"""
from car_tf.car.callback import CARCallback
from car_tf.car.loss import CARLoss
from car_tf.car.state import CARState, attach_car_state

__all__ = ["CARCallback", "CARLoss", "CARState", "attach_car_state"]
