"""car_tf: long-tailed image recognition in TensorFlow / Keras.

The public entry points for use in your own Keras code::

    loss = car_tf.CARLoss(class_counts, base="ce", spec_lambda=0.3)
    model.compile(optimizer, loss=loss)
    model.fit(ds, callbacks=[car_tf.CARCallback(loss)])
"""

from car_tf.car import CARCallback, CARLoss, CARState, SparseCARState, attach_car_state

__all__ = ["CARCallback", "CARLoss", "CARState", "SparseCARState", "attach_car_state"]
