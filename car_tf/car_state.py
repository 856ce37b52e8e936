"""The state CAR carries across steps, as non-trainable weights of a layer attached to the model.

Attached as ``model.car_state`` it is saved by ``model.save_weights``, ModelCheckpoint and
BackupAndRestore with everything else. Every weight uses aggregation "only_first_replica": all
replicas compute the same update from the gathered batch confusion, so one copy is enough and the
variable stays identical on every replica.
"""

import keras

ATTRIBUTE = "car_state"


@keras.saving.register_keras_serializable(package="car_tf")
class CARState(keras.layers.Layer):
    """EMA confusion matrix, power-iteration vector, lambda and per-epoch statistics of CAR.

    ``updating`` is 1 while training and 0 during evaluation (CARCallback sets it), so
    validation batches are scored against the EMA without changing it.
    """

    def __init__(self, num_classes, spec_lambda=0.3, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.num_classes = int(num_classes)
        self.initial_lambda = float(spec_lambda)

        def weight(name, shape, initializer="zeros"):
            return self.add_weight(
                name=name,
                shape=shape,
                initializer=initializer,
                trainable=False,
                aggregation="only_first_replica",
            )

        k = self.num_classes
        self.ema = weight("ema", (k, k))
        self.initialized = weight("initialized", ())
        self.power_v = weight("power_v", (k,), keras.initializers.Constant(k**-0.5))
        self.spec_lambda = weight("spec_lambda", (), keras.initializers.Constant(spec_lambda))
        self.sigma_sum = weight("sigma_sum", ())
        self.sigma_count = weight("sigma_count", ())
        self.last_sigma = weight("last_sigma", ())
        self.updating = weight("updating", (), "ones")

    def call(self, inputs):
        return inputs

    def reset_epoch_statistics(self):
        self.sigma_sum.assign(0.0)
        self.sigma_count.assign(0.0)

    def mean_sigma(self):
        """Mean spectral norm over the steps since the last reset (the last one if none)."""
        count = float(self.sigma_count.numpy())
        return float(self.sigma_sum.numpy()) / count if count else float(self.last_sigma.numpy())

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "spec_lambda": self.initial_lambda,
        }


def attach_car_state(model, loss):
    """Puts ``loss``'s state on ``model`` (creating it in the model's strategy scope) and returns it.

    If the model already carries a CAR state of the right size it is reused, so a model restored
    from a checkpoint keeps its EMA.
    """
    state = getattr(model, ATTRIBUTE, None)
    if state is not None and state.num_classes != loss.num_classes:
        raise ValueError(
            f"the model carries a CAR state for {state.num_classes} classes but the CARLoss has "
            f"{loss.num_classes} class counts; build the loss with the model's class counts."
        )
    if state is None:
        with model.distribute_strategy.scope():
            state = CARState(loss.num_classes, spec_lambda=loss.spec_lambda, name=ATTRIBUTE)
        setattr(model, ATTRIBUTE, state)
    loss.state = state
    return state
