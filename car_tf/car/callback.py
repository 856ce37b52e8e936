"""CARCallback: owns CARLoss's state on the model, logs the penalty, optionally ramps lambda."""

import keras

from car_tf.car.carrier import attach_car_state
from car_tf.car.loss import CARLoss
from car_tf.car.settings import CARSettings


class CARCallback(keras.callbacks.Callback):
    """Lifecycle of a CARLoss inside ``model.fit``.

    * ``set_model`` (before Keras traces the train step) attaches the loss's state to the model as
      ``model.car_state``, so checkpoints, ModelCheckpoint, BackupAndRestore and ``model.save``
      (.keras) keep the EMA; a model that already carries one (restored from any of them, e.g.
      by ``keras.models.load_model``) continues with it.
    * Each epoch adds ``car_spectral_norm`` (mean sigma_max over the epoch's steps) and
      ``car_penalty`` (lambda times it) to the epoch's logs, which History, CSVLogger and
      keras.callbacks.TensorBoard record when listed after this callback.
    * During validation and ``model.evaluate(..., callbacks=[it])`` the EMA is left unchanged.
    * ``lambda_warmup_epochs`` > 0 ramps lambda linearly from 0 to its target over those epochs
      (the released code uses no ramp). The ramp depends only on the epoch number, so a resumed run
      continues it correctly.

    Args:
        loss: the CARLoss given to ``compile``; found in ``model.loss`` when omitted.
        lambda_warmup_epochs: epochs of linear lambda ramp-up.
    """

    def __init__(self, loss=None, lambda_warmup_epochs=CARSettings.lambda_warmup_epochs):
        super().__init__()
        self.loss = loss
        self.lambda_warmup_epochs = int(lambda_warmup_epochs)

    def set_model(self, model):
        super().set_model(model)
        if self.loss is None:
            self.loss = find_car_loss(model)
        attach_car_state(model, self.loss)

    def on_epoch_begin(self, epoch, logs=None):
        state = self.loss.state
        state.reset_epoch_statistics()
        target = self.loss.spec_lambda
        if self.lambda_warmup_epochs > 0:
            target *= min(1.0, epoch / self.lambda_warmup_epochs)
        state.spec_lambda.assign(target)

    def on_test_begin(self, logs=None):
        self.loss.state.updating.assign(0.0)

    def on_test_end(self, logs=None):
        self.loss.state.updating.assign(1.0)

    def on_epoch_end(self, epoch, logs=None):
        state = self.loss.state
        sigma = state.mean_sigma()
        values = {
            "car_spectral_norm": sigma,
            "car_penalty": float(state.spec_lambda.numpy()) * sigma,
        }
        if logs is not None:
            logs.update(values)


def find_car_loss(model):
    """The CARLoss ``model`` was compiled with, or a clear error."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, CARLoss):
        return loss
    raise ValueError(
        "CARCallback found no CARLoss in model.loss; compile the model with car_tf.CARLoss(...) "
        "or pass the loss to CARCallback(loss)."
    )
