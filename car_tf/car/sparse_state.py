"""A sparse EMA for label spaces where one dense K x K matrix does not fit (100,000 classes and more).

SparseCARState keeps, for each true class j, the ``sparse_entries`` (m) largest entries of the
EMA's column Cbar[:, j], its class's heaviest confusions, as (row, value) pairs, and the mass of
all the others as one number spread evenly over the column's K rows; the dense state's per-column
decay applies to both. That is 2 K x m + K numbers instead of K x K. A step renews the batch's
columns: each becomes decay * stored + weight * C_t's column as a dense K-vector, whose m largest
entries are kept and the rest of whose mass joins the spread (O(K x B)). A product with the EMA
costs O(K x m x r).

It approximates the dense EMA: it keeps where each class's confusion goes for its m heaviest
confusions and only how much of it goes elsewhere. The spread captures the near-uniform
confusion of an untrained model, and the entries the concentrated confusion of a trained one.
README's "CAR's cost" section measures sigma and its gradient against the dense EMA.
"""

import keras
from keras import ops

from car_tf.backend import read, read_rows, widest_float, write_rows
from car_tf.car.settings import CARSettings
from car_tf.car.state import CARState, first_for_padding


def checked_sparse_entries(entries, num_classes):
    """``entries`` as an int in [1, K], or a one-sentence ValueError; None stays None (dense)."""
    if entries is None:
        return None
    if isinstance(entries, bool) or int(entries) != entries or not 1 <= entries <= num_classes:
        raise ValueError(
            f"sparse_ema_entries={entries!r} must be a whole number from 1 to the {num_classes} "
            "classes (for example 32), or None for the dense EMA."
        )
    return int(entries)


@keras.saving.register_keras_serializable(package="car_tf")
class SparseCARState(CARState):
    """CARState whose EMA keeps each true class's ``sparse_entries`` largest confusions and the
    mass of the others, spread evenly (see the module's docstring)."""

    def __init__(self, num_classes, sparse_entries, spec_lambda=CARSettings.spec_lambda, **kwargs):
        self.sparse_entries = checked_sparse_entries(sparse_entries, num_classes)
        super().__init__(num_classes, spec_lambda=spec_lambda, **kwargs)

    def _create_ema_columns(self, weight):
        shape = (self.num_classes, self.sparse_entries)
        # Cbar[:, j] = ema_decay[j] * (ema_values[j, t] at rows ema_rows[j, t], t < m, plus
        # ema_rest[j] / K in every row): the largest entries, and the mass of the dropped ones.
        self.ema_rows = weight("ema_rows", shape, dtype="int32")
        self.ema_values = weight("ema_values", shape)
        self.ema_rest = weight("ema_rest", (self.num_classes,))

    def _decayed(self, dtype="float32"):
        """(values [K, m], spread mass per row [K]) of each column, decay applied, as ``dtype``."""
        decay = self._column_decay(dtype)
        values, rest = (ops.cast(read(x), dtype) for x in (self.ema_values, self.ema_rest))
        return decay[:, None] * values, decay * rest / self.num_classes

    def ema_matrix(self):
        values, spread = self._decayed()
        columns = _scattered(read(self.ema_rows), values, self.num_classes)  # [K columns, K rows]
        return ops.transpose(columns) + spread[None, :]

    # The products sum up to K terms one after another (a row that many classes confuse with, the
    # spread), so they run in float64 where the backend has it: in float32 their rounding differs
    # between Cbar X and Cbar^T Y by more than the power iteration's tolerance at K = 20,000.
    def ema_times(self, x):
        """Cbar X [K, r]: each stored entry (i, j) adds Cbar[i, j] X[j] to row i."""
        values, spread = self._decayed(widest_float())
        x = ops.cast(x, values.dtype)
        terms = values[:, :, None] * x[:, None, :]  # [K, m, r]
        rows = ops.reshape(read(self.ema_rows), (-1,))
        entries = ops.segment_sum(ops.reshape(terms, (-1, x.shape[-1])), rows, self.num_classes)
        return ops.cast(entries + ops.sum(spread[:, None] * x, axis=0, keepdims=True), "float32")

    def ema_transpose_times(self, y):
        """Cbar^T Y [K, r]: column j's entries against the rows of Y they sit in."""
        values, spread = self._decayed(widest_float())
        y = ops.cast(y, values.dtype)
        gathered = ops.take(y, read(self.ema_rows), axis=0)  # [K, m, r]
        entries = ops.einsum("km,kmr->kr", values, gathered)
        return ops.cast(entries + spread[:, None] * ops.sum(y, axis=0, keepdims=True), "float32")

    def _renew_columns(self, rows, padding, factor, added):
        """Stored columns ``rows`` <- the m largest entries of factor * stored + added ([R, K]),
        the mass of the others added to the column's spread mass. Returns the change of those
        columns: added, less the dropped entries, which are spread instead."""
        width = self.num_classes
        stored = factor[:, None] * read_rows(self.ema_values, rows)
        dense = added + _scattered(read_rows(self.ema_rows, rows), stored, width)
        values, kept = ops.top_k(dense, k=self.sparse_entries)
        dropped = ops.sum(dense, axis=1) - ops.sum(values, axis=1)
        rest = factor * read_rows(self.ema_rest, rows) + dropped
        kept = ops.cast(kept, "int32")
        write_rows(self.ema_rest, rows, first_for_padding(rest, padding))
        write_rows(self.ema_values, rows, first_for_padding(values, padding))
        write_rows(self.ema_rows, rows, first_for_padding(kept, padding))
        return added - (dense - _scattered(kept, values, width)), dropped / width

    def get_config(self):
        return {**super().get_config(), "sparse_entries": self.sparse_entries}


def _scattered(indices, values, width):
    """Rows [R, width] holding ``values`` [R, m] at the columns ``indices`` [R, m], 0 elsewhere."""
    slots = ops.repeat(ops.arange(ops.shape(indices)[0])[:, None], ops.shape(indices)[1], axis=1)
    where = ops.reshape(ops.stack([slots, indices], axis=-1), (-1, 2))
    return ops.scatter(where, ops.reshape(values, (-1,)), (ops.shape(indices)[0], width))
