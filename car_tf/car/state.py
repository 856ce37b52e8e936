"""The state CAR carries across steps, as non-trainable weights of a layer attached to the model.

Attached as ``model.car_state`` (car_tf.car.carrier) it is saved by ``model.save_weights``,
ModelCheckpoint and BackupAndRestore with everything else, and ``model.save("x.keras")`` records
it in the model's config too, so ``keras.models.load_model`` (with car_tf imported) gives the
model back with its state. Every weight uses aggregation "only_first_replica": all
replicas compute the same update from the gathered batch confusion, so one copy is enough and the
variable stays identical on every replica.
"""

import functools

import keras
from keras import ops

from car_tf.backend import is_tensorflow, read_rows, widest_float, write_rows
from car_tf.car import spectral
from car_tf.car.settings import CARSettings

ATTRIBUTE = "car_state"


@keras.saving.register_keras_serializable(package="car_tf")
class CARState(keras.layers.Layer):
    """EMA confusion matrix, power-iteration bases, lambda and per-epoch statistics of CAR.

    ``updating`` is 1 while training and 0 during evaluation (CARCallback sets it), so
    validation batches are scored against the EMA without changing it.
    """

    sparse_entries = None  # columns stored dense (SparseCARState: their largest entries)

    def __init__(self, num_classes, spec_lambda=CARSettings.spec_lambda, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.num_classes = int(num_classes)
        self.initial_lambda = float(spec_lambda)

        def weight(name, shape, initializer="zeros", dtype="float32"):
            return self.add_weight(
                name=name,
                shape=shape,
                initializer=initializer,
                dtype=dtype,
                trainable=False,
                aggregation="only_first_replica",
            )

        k = self.num_classes
        self._create_ema_columns(weight)
        self.ema_decay = weight("ema_decay", (k,), "ones", dtype=widest_float())
        self.initialized = weight("initialized", ())
        # Block power iteration on A = Cbar diag(w): bases U, V [K, r] and A V, A^T U, kept current.
        r = min(k, spectral.POWER_VECTORS)

        def start(shape, dtype=None):
            return spectral.start_basis(*shape)

        self.power_u = weight("power_u", (k, r), start)
        self.power_v = weight("power_v", (k, r), start)
        self.power_av = weight("power_av", (k, r))
        self.power_atu = weight("power_atu", (k, r))
        self.power_passes = weight("power_passes", ())  # passes over the EMA so far, for diagnosis
        self.spec_lambda = weight("spec_lambda", (), keras.initializers.Constant(spec_lambda))
        self.sigma_sum = weight("sigma_sum", ())
        self.sigma_count = weight("sigma_count", ())
        self.last_sigma = weight("last_sigma", ())
        self.updating = weight("updating", (), "ones")

    def _create_ema_columns(self, weight):
        # Cbar[:, j] = ema_decay[j] * ema_columns[j, :] (the column-wise EMA of confusion.py).
        self.ema_columns = weight("ema_columns", (self.num_classes, self.num_classes))

    def call(self, inputs):
        return inputs

    def ema_matrix(self):
        """The EMA confusion Cbar [K, K] as a dense tensor (rows predicted, columns true class)."""
        return ops.transpose(self._column_decay()[:, None] * ops.convert_to_tensor(self.ema_columns))

    def _column_decay(self, dtype="float32"):
        """d_j of every column as ``dtype`` (stored in float64 where the backend has it)."""
        return ops.cast(ops.convert_to_tensor(self.ema_decay), dtype)

    def ema_times(self, x):
        """Cbar X [K, r] of a block X [K, r], without forming Cbar: one pass over the stored columns."""
        decay_x = self._column_decay()[:, None] * x
        return ops.transpose(_matrix_products()[0](self.ema_columns.value, decay_x))

    def ema_transpose_times(self, y):
        """Cbar^T Y [K, r] of a block Y [K, r], without forming Cbar: one pass over the columns."""
        return self._column_decay()[:, None] * _matrix_products()[1](self.ema_columns.value, y)

    def update_ema(self, columns, ids, decay, weight, updating, blocks=None):
        """Cbar <- decay * Cbar + weight * C_t, touching only the batch's columns (O(K * B)).

        ``columns`` [B*m, K] are C_t's columns ``ids`` [B*m] (repeats add up), already divided by
        the class mass; ``decay`` and ``weight`` come from confusion.ema_coefficients. With
        ``updating`` 0 every stored value is written back unchanged. Given ``blocks`` (X, Y) of
        K x r, returns (D X, D^T Y) of the change D = Cbar_new - decay * Cbar_old, so that products
        with the EMA can follow it between steps.
        """
        present = ops.segment_sum(ops.ones_like(ids, "float32"), ids, self.num_classes) > 0
        present = ops.logical_and(present, ops.cast(updating, "bool"))
        decayed = decay * ops.convert_to_tensor(self.ema_decay)
        rows, inverse, padding = _distinct(ids)
        summed = ops.segment_sum(columns, inverse, num_segments=ops.shape(rows)[0])
        # Bring the batch's stored columns up to date and add the batch; their d_j becomes 1.
        factor = ops.where(ops.take(present, rows), ops.take(decayed, rows), 1.0)
        added = ops.cast(weight, "float32") * summed
        change = self._renew_columns(rows, padding, ops.cast(factor, "float32"), added)
        self.ema_decay.assign(ops.where(present, 1.0, decayed))
        if blocks is not None:
            return _change_products(*change, rows, padding, *blocks, self.num_classes)

    def _renew_columns(self, rows, padding, factor, added):
        """Stored columns ``rows`` <- factor * stored + added ([R, K]); padding slots left as they are.

        Returns the change of those columns, (entries [R, K], mass spread over every row [R] or
        None), padding slots included.
        """
        new = factor[:, None] * read_rows(self.ema_columns, rows) + added
        write_rows(self.ema_columns, rows, first_for_padding(new, padding))
        return added, None

    def reset_epoch_statistics(self):
        self.sigma_sum.assign(0.0)
        self.sigma_count.assign(0.0)

    def mean_sigma(self):
        """Mean spectral norm over the steps since the last reset (the last one if none)."""
        count = float(self.sigma_count.numpy())
        return float(self.sigma_sum.numpy()) / count if count else float(self.last_sigma.numpy())

    def get_config(self):
        config = {
            **super().get_config(),
            "num_classes": self.num_classes,
            "spec_lambda": self.initial_lambda,
        }
        del config["trainable"]  # always False, set by __init__
        return config


def _distinct(ids):
    """(distinct ids in ascending order, each id's slot, padding mask) of a batch's class ids.

    There are as many slots as ids, so every shape is known when the step is compiled (XLA, JAX);
    the spare slots repeat the smallest id and are flagged.
    """
    size = ops.shape(ids)[0]
    order = ops.argsort(ids)
    ascending = ops.take(ids, order)
    starts = ops.concatenate([ops.ones((1,), "int32"), ops.cast(ascending[1:] > ascending[:-1], "int32")])
    slot = ops.cumsum(starts) - 1  # each sorted id's slot
    inverse = ops.scatter(order[:, None], slot, (size,))  # order is a permutation: no repeats
    padding = ops.arange(size) > slot[-1]
    rows = ops.where(padding, ascending[0], ops.segment_max(ascending, slot, num_segments=size))
    return rows, inverse, padding


def _change_products(change, spread, rows, padding, x, y, num_classes):
    """(D X, D^T Y) [K, r] of a change D that is nonzero in the columns ``rows`` only:
    D[:, rows[s]] = change[s] + spread[s] in every row, for the slots s that are not padding.

    Computed in float64 where the backend has it: D^T Y's spread term sums K rows of Y.
    """
    dtype = widest_float()
    valid = ops.cast(ops.logical_not(padding), dtype)
    change = ops.cast(change, dtype) * valid[:, None]
    x_rows = ops.take(ops.cast(x, dtype), rows, axis=0)  # [R, r]
    y = ops.cast(y, dtype)
    dx = ops.matmul(ops.transpose(change), x_rows)
    dty_rows = ops.matmul(change, y)  # [R, r]
    if spread is not None:
        spread = ops.cast(spread, dtype) * valid
        dx = dx + ops.sum(spread[:, None] * x_rows, axis=0, keepdims=True)
        dty_rows = dty_rows + spread[:, None] * ops.sum(y, axis=0, keepdims=True)
    dty = ops.segment_sum(dty_rows * valid[:, None], rows, num_segments=num_classes)
    return ops.cast(dx, "float32"), ops.cast(dty, "float32")


def first_for_padding(new, padding):
    """``new`` [R, ...] with padding slots, which repeat the first row's id, given its value, so
    that repeated writes agree."""
    mask = ops.reshape(padding, (-1,) + (1,) * (len(new.shape) - 1))
    return ops.where(mask, new[:1], new)


# The EMA is read and written by rows only, in place. TensorFlow copies a variable on every dense
# read once it has been updated in place (so that row updates never copy it); an XLA-compiled
# function reads the variable's buffer directly, so a pass over the matrix copies nothing.
def _transposed_times(matrix, x):
    """(M^T X)^T [r, K]: in this form XLA streams the rows of M (transposed inside, 3x slower)."""
    return ops.einsum("kj,kr->rj", matrix, x)


def _times(matrix, y):
    return ops.matmul(matrix, y)


@functools.cache
def _matrix_products():
    """((M^T X)^T, M Y) of a variable's value M and K x r blocks; XLA reads M in place under TF."""
    if not is_tensorflow():
        return _transposed_times, _times  # compiled with the train step
    import tensorflow as tf

    compiled = functools.partial(tf.function, jit_compile=True, autograph=False)
    return compiled(_transposed_times), compiled(_times)
