"""Run the same training function under one replica and under two logical-CPU replicas."""

import functools

import numpy as np
import tensorflow as tf


@functools.cache
def strategies():
    """A one-device strategy and a MirroredStrategy over the two logical CPUs of conftest.py.

    Built once per process: a second MirroredStrategy would reuse the first one's collective
    instance keys and abort when the two see tensors of different shapes.
    """
    return {
        "one_device": tf.distribute.OneDeviceStrategy("/cpu:0"),
        "mirrored": tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
    }


def run_under_strategies(fn):
    """Calls fn(strategy) for each strategy and returns {name: result}.

    fn must build its model (and anything holding variables) inside ``strategy.scope()`` and return
    NumPy arrays (or lists/dicts of them) that should agree across strategies.
    """
    return {name: fn(strategy) for name, strategy in strategies().items()}


def assert_results_close(results, atol=1e-5, rtol=1e-5):
    """Asserts every strategy's result equals the one-device result."""
    reference = tf.nest.flatten(results["one_device"])
    for name, result in results.items():
        for ref, got in zip(reference, tf.nest.flatten(result), strict=True):
            np.testing.assert_allclose(got, ref, atol=atol, rtol=rtol, err_msg=name)
