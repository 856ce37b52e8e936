"""Shared checks for Keras objects (keras-hub habit): serialization round trip, mixed precision.

Use from any test module: ``from keras_roundtrip import assert_serialization_roundtrip``.
"""

import copy
import json
import pathlib
import tempfile

import keras
import numpy as np

_TOLERANCE = {"mixed_float16": 1e-2, "mixed_bfloat16": 5e-2}


def _call(obj, inputs):
    return obj(*inputs) if isinstance(inputs, tuple) else obj(inputs)


def _as_arrays(outputs):
    flat = keras.tree.flatten(outputs)
    return [np.asarray(keras.ops.convert_to_numpy(o), dtype=np.float64) for o in flat]


def _plain(config):
    """The config as JSON would give it back (tuples become lists)."""
    return json.loads(json.dumps(config))


def _assert_same_outputs(expected, got, atol, what):
    for e, g in zip(_as_arrays(expected), _as_arrays(got), strict=True):
        np.testing.assert_allclose(g, e, atol=atol, rtol=atol, err_msg=what)


def _wrap_in_model(layer, inputs):
    """A functional model around ``layer``, its inputs shaped like ``inputs`` (nesting kept)."""
    symbolic = keras.tree.map_structure(lambda a: keras.Input(shape=a.shape[1:], dtype=str(a.dtype)), inputs)
    model_inputs = keras.tree.flatten(symbolic)
    return keras.Model(model_inputs, _call(layer, symbolic))


def assert_serialization_roundtrip(obj, inputs=None, *, atol=1e-6):
    """Checks get_config/from_config, JSON (de)serialization and, for layers, a .keras save/load.

    obj: a Layer, Model, Loss, Regularizer or other Keras object with get_config.
    inputs: optional array (or tuple of arrays, passed positionally) to call obj with; with them the
      clone (weights copied) and the model reloaded from a .keras file must give obj's outputs.
      A Layer that is not a Model is wrapped in a functional model for the .keras round trip.
    Returns the object rebuilt from its serialized form.
    """
    config = obj.get_config()
    clone = type(obj).from_config(copy.deepcopy(config))  # from_config may consume its argument
    assert _plain(clone.get_config()) == _plain(config), "from_config changed the config"
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(obj)))
    revived = keras.saving.deserialize_keras_object(serialized)
    assert type(revived) is type(obj), f"deserialized {type(revived)} instead of {type(obj)}"
    assert _plain(revived.get_config()) == _plain(config), "deserialization changed the config"
    if inputs is None:
        return revived

    expected = _call(obj, inputs)
    if not isinstance(obj, keras.layers.Layer):
        _assert_same_outputs(expected, _call(revived, inputs), atol, "deserialized object")
        return revived
    _call(clone, inputs)  # builds the weights
    clone.set_weights(obj.get_weights())
    _assert_same_outputs(expected, _call(clone, inputs), atol, "from_config clone")

    model = obj if isinstance(obj, keras.Model) else _wrap_in_model(obj, inputs)
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "roundtrip.keras"
        model.save(path)
        loaded = keras.saving.load_model(path)
    _assert_same_outputs(expected, _call(loaded, inputs), atol, "model reloaded from .keras")
    return revived


def assert_mixed_precision(layer_or_factory, inputs, *, policies=tuple(_TOLERANCE), rtol=None):
    """Checks outputs under mixed precision: dtype follows the policy; models return float32 logits.

    layer_or_factory: a Layer (not a Model), rebuilt from its config with each policy as ``dtype``
      and expected to output the policy's compute dtype; or a zero-argument function building a
      Layer or Model under the global policy (a Model's floating outputs must be float32 while
      some of its layers compute in the policy's dtype).
    The mixed-precision object gets the float32 object's weights and must match its outputs within
    ``rtol`` (default 1e-2 for float16, 5e-2 for bfloat16) relative to the largest output.
    """
    if isinstance(layer_or_factory, keras.Model):
        raise TypeError("pass a zero-argument function that builds the model, not the model itself")
    if isinstance(layer_or_factory, keras.layers.Layer):
        config = layer_or_factory.get_config()

        def build(policy):
            return type(layer_or_factory).from_config({**copy.deepcopy(config), "dtype": policy})

        reference = layer_or_factory
    else:
        def build(policy):
            previous = keras.mixed_precision.global_policy()
            keras.mixed_precision.set_global_policy(policy)
            try:
                return layer_or_factory()
            finally:
                keras.mixed_precision.set_global_policy(previous)

        reference = build("float32")
    expected = _call(reference, inputs)

    for policy in policies:
        compute_dtype = keras.mixed_precision.Policy(policy).compute_dtype
        mixed = build(policy)
        _call(mixed, inputs)  # builds the weights
        mixed.set_weights(reference.get_weights())
        outputs = keras.tree.flatten(_call(mixed, inputs))
        if isinstance(mixed, keras.Model):
            want = "float32"
            assert any(layer.compute_dtype == compute_dtype for layer in mixed.layers), (
                f"no layer of the model computes in {compute_dtype} under {policy}"
            )
        else:
            want = compute_dtype
        for output in outputs:
            if "float" in str(output.dtype):
                assert keras.backend.standardize_dtype(output.dtype) == want, (
                    f"output dtype {output.dtype} under {policy}, expected {want}"
                )
        tolerance = _TOLERANCE.get(policy, 1e-2) if rtol is None else rtol
        for e, g in zip(_as_arrays(expected), _as_arrays(outputs), strict=True):
            assert np.all(np.isfinite(g)), f"non-finite outputs under {policy}"
            error = np.max(np.abs(g - e)) / max(np.max(np.abs(e)), 1e-6)
            assert error <= tolerance, (
                f"relative error {error:.3g} under {policy} exceeds {tolerance}"
            )
