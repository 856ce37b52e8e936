"""A sparse EMA for label spaces where one dense K x K matrix does not fit (100,000 classes and more).

SparseCARState keeps, for each true class j, only the ``sparse_entries`` (m) largest entries of
the EMA's column Cbar[:, j], its class's heaviest confusions, as (row, value) pairs with the dense
state's per-column decay: 2 K x m numbers instead of K x K. A step renews the batch's columns: each
becomes decay * stored + weight * C_t's column as a dense K-vector, of which the m largest entries
are kept (O(K x B)); a product with the EMA costs O(K x m x r).

This is an approximation of the dense EMA: each renewal drops the entries below the column's m-th
largest, so sigma falls below the dense penalty where a class's confusion is spread over many
classes (an untrained model's is near-uniform) and nears it as confusion concentrates on a few.
README's "CAR's cost" section measures the error against the dense EMA.
"""

import keras
from keras import ops

from car_tf.backend import read
from car_tf.car.state import CARState, first_for_padding, read_rows, write_rows


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
    """CARState whose EMA keeps each true class's ``sparse_entries`` largest confusions."""

    exact_recurrence = False

    def __init__(self, num_classes, sparse_entries, spec_lambda=0.3, **kwargs):
        self.sparse_entries = checked_sparse_entries(sparse_entries, num_classes)
        super().__init__(num_classes, spec_lambda=spec_lambda, **kwargs)

    def _create_ema_columns(self, weight):
        shape = (self.num_classes, self.sparse_entries)
        # Cbar[ema_rows[j, t], j] = ema_decay[j] * ema_values[j, t]; column j is 0 elsewhere.
        self.ema_rows = weight("ema_rows", shape, dtype="int32")
        self.ema_values = weight("ema_values", shape)

    def _decayed_values(self):
        return self._column_decay()[:, None] * read(self.ema_values)

    def ema_matrix(self):
        k = self.num_classes
        columns = ops.repeat(ops.arange(k)[:, None], self.sparse_entries, axis=1)
        where = ops.stack([read(self.ema_rows), columns], axis=-1)
        return ops.scatter(ops.reshape(where, (-1, 2)), ops.reshape(self._decayed_values(), (-1,)), (k, k))

    def ema_times(self, x):
        """Cbar X [K, r]: each stored entry (i, j) adds Cbar[i, j] X[j] to row i."""
        terms = self._decayed_values()[:, :, None] * x[:, None, :]  # [K, m, r]
        rows = ops.reshape(read(self.ema_rows), (-1,))
        return ops.segment_sum(ops.reshape(terms, (-1, x.shape[-1])), rows, self.num_classes)

    def ema_transpose_times(self, y):
        """Cbar^T Y [K, r]: column j's entries against the rows of Y they sit in."""
        gathered = ops.take(y, read(self.ema_rows), axis=0)  # [K, m, r]
        return ops.einsum("km,kmr->kr", self._decayed_values(), gathered)

    def _renew_columns(self, rows, padding, factor, added):
        """Stored columns ``rows`` <- the m largest entries of factor * stored + added ([R, K])."""
        stored_rows = read_rows(self.ema_rows, rows)  # [R, m]
        stored = factor[:, None] * read_rows(self.ema_values, rows)
        slots = ops.repeat(ops.arange(ops.shape(rows)[0])[:, None], self.sparse_entries, axis=1)
        where = ops.reshape(ops.stack([slots, stored_rows], axis=-1), (-1, 2))
        dense = added + ops.scatter(where, ops.reshape(stored, (-1,)), ops.shape(added))
        values, kept = ops.top_k(dense, k=self.sparse_entries)
        write_rows(self.ema_values, rows, first_for_padding(values, padding))
        write_rows(self.ema_rows, rows, first_for_padding(ops.cast(kept, "int32"), padding))

    def get_config(self):
        return {**super().get_config(), "sparse_entries": self.sparse_entries}
