"""What the library core needs from the Keras backend beyond ``keras.ops``.

A label check that stops a compiled step, TensorFlow's row kernels and compiled inference (the
replicas a step runs on are car_tf.distribute's). TensorFlow is imported only under the TensorFlow
backend, so ``import car_tf`` under JAX or PyTorch works without it.
"""

import functools
import logging

import keras
from keras import ops


def import_tensorflow(user):
    """The tensorflow module, for ``user`` (a module that needs it); one sentence where it is missing."""
    try:
        import tensorflow
    except ImportError as error:
        raise ImportError(
            f"{user} needs TensorFlow, which cannot be imported here ({error}); install "
            "tensorflow==2.21.0, or under KERAS_BACKEND=jax or torch use the parts README's 'Keras "
            "backends' lists."
        ) from None
    return tensorflow


def is_tensorflow():
    return keras.backend.backend() == "tensorflow"


def widest_float():
    """"float64", or "float32" under JAX without x64 mode (where float64 would be truncated anyway)."""
    if keras.backend.backend() == "jax":
        import jax

        return "float64" if jax.config.jax_enable_x64 else "float32"
    return "float64"


def read(variable):
    """A variable's value now, as a tensor that a later ``assign`` in the same step leaves alone.

    Under TensorFlow ``convert_to_tensor`` of a Keras variable is the tf.Variable itself, which an
    op created after an ``assign`` reads after it; the copy pins the value read here.
    """
    return ops.copy(ops.convert_to_tensor(variable))


def checked_labels(labels, num_classes):
    """Integer labels as int32, checked to lie in [0, K) before anything indexes by them.

    A gather or one-hot by an out-of-range label would give a wrong number without a word; this
    stops the step with a sentence instead (``stop_unless``).
    """
    labels = ops.cast(labels, "int32")
    message = (f"a label lies outside [0, {num_classes}); check the data set's labels and the "
               "number of classes.")
    return stop_unless(ops.all(ops.logical_and(labels >= 0, labels < num_classes)), message, labels)


# The sentences ``stop_unless`` has put into steps in this process: a compiled step raises them
# wrapped in the backend's own error (TensorFlow's InvalidArgumentError: "Graph execution error"
# and the node's trace; JAX's JaxRuntimeError: "CpuCallback error"), where ``step_sentence`` finds them.
_STEP_SENTENCES = set()


def stop_unless(condition, message, value):
    """``value``, after stopping the step with ``message`` where the scalar ``condition`` is false:
    a graph assertion under TensorFlow, a host callback under JAX's jit, at once on eager backends.
    The command lines print ``message`` alone (``step_sentence``)."""
    _STEP_SENTENCES.add(message)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        check = tf.debugging.assert_equal(condition, True, message=message)
        with tf.control_dependencies([check]):  # a data dependency of the value returned
            return tf.identity(value)
    if backend == "jax":
        import jax

        def stop_if_false(ok):
            if not ok:
                raise ValueError(message)

        _quiet_jax_callback_log()
        jax.debug.callback(stop_if_false, condition)
    elif not bool(condition):
        raise ValueError(message)
    return value


def step_sentence(error):
    """The sentence of a check that stopped a step (``stop_unless``) inside ``error``, whatever
    framework error wraps it, or None."""
    text = str(error).replace("\\'", "'")  # TensorFlow's assertion message escapes quotes
    return next((message for message in sorted(_STEP_SENTENCES, key=len, reverse=True) if message in text), None)


class _StepStopFilter(logging.Filter):
    """Drops JAX's log record (with its trace) of a host callback that ``stop_unless`` stopped:
    the error that JAX raises after it carries the sentence."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, ValueError) and str(error) in _STEP_SENTENCES)


@functools.cache
def _quiet_jax_callback_log():
    logging.getLogger("jax._src.debugging").addFilter(_StepStopFilter())


def read_rows(variable, rows):
    """variable[rows] without reading the whole variable (this replica's copy under a strategy):
    TensorFlow's row kernel on the variable's handle, since a dense read of a variable updated row by
    row copies it."""
    if not is_tensorflow():
        return ops.take(variable.value, rows, axis=0)
    import tensorflow as tf

    handle = variable.value.handle
    return tf.raw_ops.ResourceGather(resource=handle, indices=rows, dtype=variable.dtype)


def write_rows(variable, rows, values):
    """variable[rows] = values (repeated rows with equal values), in place under TensorFlow.

    keras.ops scatters out of place; under JAX the compiled step donates the state, so XLA
    updates the buffer in place.
    """
    if not is_tensorflow():
        variable.assign(ops.scatter_update(variable.value, rows[:, None], values))
        return
    import tensorflow as tf

    variable.value.scatter_update(tf.IndexedSlices(values, rows))


def compiled_inference(model):
    """``images -> outputs`` of ``model`` in inference mode, compiled once per input shape, as NumPy.

    A tf.function under TensorFlow; elsewhere Keras's own compiled predict step (jit under JAX).
    """
    if is_tensorflow():
        import tensorflow as tf

        call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        return lambda images: keras.ops.convert_to_numpy(call(images))
    return lambda images: keras.ops.convert_to_numpy(model.predict_on_batch(images))
