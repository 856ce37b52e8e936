"""The one place where car_tf relies on Keras internals (``keras.src`` or private methods).

Each use is a small named function with the reason it is needed. All were checked against
Keras 3.15.1 (requirements allow 3.10 to 3.15); tests/test_keras_compat.py exercises every one on
a tiny model and fails with a message naming the function if a Keras upgrade moves or changes it.
Everything else in car_tf uses the public API only.
"""

from keras.src.backend.common.symbolic_scope import in_symbolic_scope
from keras.src.models.functional import Functional

# The class of ``keras.Model(inputs, outputs)``. Keras exports no public name for it, and
# car_tf.car.state needs it to give such models a registered subclass that records CAR's state
# in the model's config (so that ``keras.models.load_model`` restores it).
FunctionalModel = Functional


def in_symbolic_build():
    """True while Keras traces a model and its loss on shapes only (``compute_output_spec``).

    Under a distribution strategy ``fit`` builds the compiled loss this way before any callback
    runs, i.e. before CARCallback has given CARLoss its state; the loss then returns the base
    loss alone. Keras marks that pass only with its internal symbolic scope.
    """
    return in_symbolic_scope()


def loss_tracker(model):
    """The ``Mean`` metric behind a compiled model's ``loss`` log.

    A ``train_step`` that computes its own total loss (ConCutMixModel's) must update this very
    metric: Keras lists it in ``model.metrics`` and resets it each epoch, and a second metric
    named "loss" would clash with it.
    """
    return model._loss_tracker


def aggregated_layer_loss(model, loss):
    """One of ``model.losses`` as ``model.compute_loss`` adds it to the compiled loss.

    Keras sums it, casts it to floatx and, under a TensorFlow strategy, divides it by the
    replica count. ConCutMixModel weights the compiled loss by alpha but the layers' losses
    (regularizers) once, so it subtracts exactly this from ``compute_loss``'s total.
    """
    return model._aggregate_additional_loss(loss)


def optimizer_variable_index(optimizer, variable):
    """The position of ``variable`` in the list the optimizer was built with.

    Keras's own optimizers index their slot variables this way in ``update_step``, where the
    variable may be a per-replica component of a distributed variable; there is no public lookup.
    """
    return optimizer._get_variable_index(variable)


def build_compiled_state(model, data_batch):
    """Builds the model, its compiled loss and metrics from one (distributed) batch's shapes.

    ``fit`` does this itself, except that under MultiWorkerMirroredStrategy (Keras 3.15) its
    reduction of the first distributed batch fails; car_tf.distribute
    calls this with the first batch instead and then ``skip_fit_build_pass``.
    """
    model._symbolic_build(data_batch=data_batch)


def skip_fit_build_pass(model):
    """Stops ``fit``, ``evaluate`` and ``predict`` from running their own build pass on ``model``."""
    model._maybe_symbolic_build = lambda *args, **kwargs: None
