"""The one module that talks to tf.distribute: strategies by name, the cluster, determinism, and
the replicas a step runs on (what a loss gathers over).

Under another Keras backend there is no strategy and TensorFlow is not imported: under JAX "auto"
spreads the batch over the devices with keras.distribution.DataParallel when there are several
(one program over the global batch, so a loss sees every replica's samples and there is nothing to
gather); under PyTorch it trains on one device (keras.distribution has no PyTorch implementation).
"""

import contextlib
import json
import os

import keras

from car_tf import backend

STRATEGIES = ("auto", "mirrored", "multi_worker", "one_device")


class NoStrategy:
    """Stands in for a tf.distribute strategy under other backends: its scope is a no-op."""

    def scope(self):
        return contextlib.nullcontext()


def make_strategy(name="auto"):
    """The strategy called ``name``.

    auto: MirroredStrategy over the visible GPUs, or the default strategy without GPUs.
    mirrored: MirroredStrategy over the visible GPUs (over the CPU without any).
    multi_worker: MultiWorkerMirroredStrategy; the cluster comes from the TF_CONFIG variable.
    one_device: the first GPU, else the CPU.
    Under other backends only "auto" exists (see the module's docstring).
    """
    if not backend.is_tensorflow():
        return _keras_distribution(name)
    import tensorflow as tf

    # Physical, not logical, devices: listing logical ones starts the runtime, after which
    # MultiWorkerMirroredStrategy can no longer configure its collectives.
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if gpus else tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "--strategy=multi_worker needs the TF_CONFIG environment variable describing the "
                "cluster and this worker's task; see BUILD.md, 'Several machines'."
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"--strategy={name!r} is not known; use one of {', '.join(STRATEGIES)}.")


def _keras_distribution(name):
    if name != "auto":
        raise ValueError(f"--strategy={name} is a TensorFlow strategy; under KERAS_BACKEND="
                         f"{keras.backend.backend()} use --strategy=auto.")
    if keras.backend.backend() != "jax":
        return NoStrategy()
    devices = keras.distribution.list_devices()
    if len(devices) > 1:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return NoStrategy()


def enable_determinism():
    """Deterministic TensorFlow kernels (slower on GPUs; runs and resumes repeat exactly).

    JAX on a CPU is deterministic already; on a GPU, XLA_FLAGS=--xla_gpu_deterministic_ops=true.
    """
    if backend.is_tensorflow():
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def _tf_config():
    return json.loads(os.environ.get("TF_CONFIG", "{}"))


def task_index():
    """This process's task index in TF_CONFIG (0 outside a cluster)."""
    return _tf_config().get("task", {}).get("index", 0)


def is_chief():
    """True on the process that writes the run directory: the chief, else worker 0, else alone."""
    config = _tf_config()
    task = config.get("task")
    if not task or task.get("type") == "chief":
        return True
    has_chief = "chief" in config.get("cluster", {})
    return task.get("type") == "worker" and task.get("index", 0) == 0 and not has_chief


def prepare_for_multi_worker(model, strategy, dataset):
    """Works around two Keras 3.15 bugs with MultiWorkerMirroredStrategy.

    1. fit starts with a build pass that reduces the first distributed batch with
       ``strategy.reduce``, which fails on the PerReplica values of a distributed dataset: build
       the compiled loss and metrics from the first batch of ``dataset`` instead, and skip that pass.
    2. The step's logs are reduced with ``reduce("MEAN", value, axis=0)``, which fails on
       scalars: give each log value a leading axis of 1, which that reduction averages away.
    """
    if isinstance(strategy, NoStrategy):
        return
    import tensorflow as tf

    from car_tf.keras_compat import build_compiled_state, skip_fit_build_pass

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    with strategy.scope():
        build_compiled_state(model, next(iter(dataset)))
    skip_fit_build_pass(model)
    train_step = model.train_step
    model.train_step = lambda data: {
        name: tf.reshape(value, [1]) for name, value in train_step(data).items()
    }


def replica_count():
    """Replicas computing the current step in sync, each on its share of the batch (1 outside a
    TensorFlow replica context and under other backends)."""
    if not backend.is_tensorflow():
        return 1
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return context.num_replicas_in_sync if context is not None else 1


def strategy_replica_count():
    """Replicas of the strategy in scope (1 without one), also outside a replica context."""
    if not backend.is_tensorflow():
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_id():
    """This replica's index among those in sync (0 outside a replica context)."""
    if not backend.is_tensorflow():
        return 0
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return context.replica_id_in_sync_group if context is not None else 0


def all_gather(values):
    """A tensor or nest of tensors concatenated along axis 0 over the replicas in sync; with a single
    replica (or another backend) the values come back unchanged."""
    if replica_count() == 1:
        return values
    import tensorflow as tf

    return tf.distribute.get_replica_context().all_gather(values, axis=0)
