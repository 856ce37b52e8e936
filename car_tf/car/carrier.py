"""Models that carry CAR's state, and ``attach_car_state``, which puts a loss's state on a model.

The state (car_tf.car.state, car_tf.car.sparse_state) is a layer set as ``model.car_state``. A
Functional or Sequential model is switched to a registered subclass whose config records it, so
``model.save("x.keras")`` and ``keras.models.load_model`` keep it.
"""

import contextlib
import warnings

import keras

from car_tf.backend import is_tensorflow
from car_tf.car.sparse_state import SparseCARState
from car_tf.car.state import ATTRIBUTE, CARState
from car_tf.keras_compat import FunctionalModel


class CarriesCARState:
    """Model mixin: the config records ``car_state``, so ``load_model`` restores it and its weights.

    Keras loads a .keras file by rebuilding the model from its config and then loading the saved
    weights into what the rebuilt model holds; a state that is a plain attribute is not rebuilt, so
    its weights are skipped. With this mixin ``from_config`` attaches the state before the weights
    load. ``attach_car_state`` switches Functional and Sequential models to a registered subclass
    carrying it; ConCutMixModel inherits it. A subclassed model of your own instead creates its
    state in ``__init__`` (``self.car_state = car_tf.CARState(num_classes)``).
    """

    @property
    def weights(self):
        return self._with_state(super().weights, "weights")

    @property
    def variables(self):
        return self._with_state(super().variables, "variables")

    def _with_state(self, variables, kind):
        """``variables`` and the state's: a Functional or Sequential model does not list a layer
        set as an attribute after it was built, and JAX's stateless train step carries only the
        variables the model lists."""
        state = getattr(self, ATTRIBUTE, None)
        if state is None:
            return variables
        seen = {id(v) for v in variables}
        return variables + [v for v in getattr(state, kind) if id(v) not in seen]

    def get_config(self):
        config = super().get_config()
        state = getattr(self, ATTRIBUTE, None)
        if state is not None:
            config[ATTRIBUTE] = keras.saving.serialize_keras_object(state)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        state_config = config.pop(ATTRIBUTE, None)
        model = super().from_config(config, custom_objects)
        if state_config is not None and getattr(model, ATTRIBUTE, None) is None:
            state = keras.saving.deserialize_keras_object(state_config, custom_objects)
            setattr(model, ATTRIBUTE, state)
        return model


@keras.saving.register_keras_serializable(package="car_tf")
class CARFunctional(CarriesCARState, FunctionalModel):
    """A functional model whose config records its CAR state."""


@keras.saving.register_keras_serializable(package="car_tf")
class CARSequential(CarriesCARState, keras.Sequential):
    """A Sequential model whose config records its CAR state."""


_CARRIERS = {FunctionalModel: CARFunctional, keras.Sequential: CARSequential}


def attach_car_state(model, loss):
    """Puts ``loss``'s state on ``model`` (creating it in the model's strategy scope) and returns it.

    If the model already carries a CAR state of the right size it is reused, so a model restored
    from a checkpoint or a .keras file keeps its EMA. A new state turns a Functional or Sequential
    model into a CARFunctional or CARSequential (same layers, weights and behaviour), so that
    ``model.save`` records it; a subclassed model should create the state in its ``__init__``.
    """
    state = getattr(model, ATTRIBUTE, None)
    if state is not None and state.num_classes != loss.num_classes:
        raise ValueError(
            f"the model carries a CAR state for {state.num_classes} classes but the CARLoss has "
            f"{loss.num_classes} class counts; build the loss with the model's class counts."
        )
    if state is not None and state.sparse_entries != loss.sparse_ema_entries:
        raise ValueError(
            f"the model carries a CAR state with {_ema_kind(state.sparse_entries)} but the CARLoss "
            f"asks for {_ema_kind(loss.sparse_ema_entries)}; build the loss with "
            f"sparse_ema_entries={state.sparse_entries}."
        )
    if state is None:
        if loss.sparse_ema_entries is None:
            cls, sizes = CARState, (loss.num_classes,)
        else:
            cls, sizes = SparseCARState, (loss.num_classes, loss.sparse_ema_entries)
        # Under JAX the global keras.distribution (if any) places the new variables.
        scope = model.distribute_strategy.scope() if is_tensorflow() else contextlib.nullcontext()
        with scope:
            state = cls(*sizes, spec_lambda=loss.spec_lambda, name=ATTRIBUTE)
        fix = (
            f"create the state in the model's __init__: self.{ATTRIBUTE} = "
            f"car_tf.{cls.__name__}({', '.join(map(str, sizes))}, spec_lambda={loss.spec_lambda})."
        )
        try:
            setattr(model, ATTRIBUTE, state)
        except ValueError:  # Keras locks a built subclassed model against new sub-layers
            name = type(model).__name__
            raise ValueError(f"{name} is built and takes no new layer; {fix}") from None
        carrier = _CARRIERS.get(type(model))
        if carrier is not None:
            model.__class__ = carrier
        elif not isinstance(model, CarriesCARState):
            warnings.warn(
                f"{type(model).__name__} does not rebuild {ATTRIBUTE} from its config, so a .keras "
                f"file of it loads without the CAR state (save_weights keeps it); {fix}",
                stacklevel=2,
            )
    loss.state = state
    return state


def _ema_kind(sparse_entries):
    if sparse_entries is None:
        return "a dense EMA"
    return f"a sparse EMA of {sparse_entries} entries per class"
