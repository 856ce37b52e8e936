"""CARLoss: a base classification loss plus lambda * sigma_max(Cbar diag(w)) (CAR, CVPR 2026, arXiv 2603.16732).

Use it with CARCallback, which puts the loss's state (the EMA, the power-iteration vectors, lambda)
on the model so that checkpoints carry it::

    loss = car_tf.CARLoss(class_counts, base="ce", spec_lambda=0.3)
    model.compile(optimizer, loss=loss)
    model.fit(ds, callbacks=[car_tf.CARCallback(loss)])

Distribution: replicas exchange their batch's contribution rows (all-gather, B * m * K numbers
rather than a K x K matrix), so every replica builds the same global batch confusion, EMA and
penalty. The penalty is added to every per-sample loss, so Keras's per-sample mean and its division
by the replica count leave penalty / replicas per replica; each replica's gradient on its own rows
is scaled back by the replica count, so the summed gradient is exactly d penalty / d rows.
"""

import keras
import numpy as np
from keras import ops

from car_tf.backend import checked_labels, read, stop_unless
from car_tf.distribute import all_gather, replica_count
from car_tf.car import confusion, spectral
from car_tf.car.settings import CARSettings
from car_tf.car.sparse_state import checked_sparse_entries
from car_tf.keras_compat import in_symbolic_build
from car_tf.losses.cross_entropy import checked_class_counts
from car_tf.losses.registry import get_base_loss

EMA_INITS = ("first_batch", "zeros")


@keras.saving.register_keras_serializable(package="car_tf")
class CARLoss(keras.losses.Loss):
    """Confusion-Aware Spectral Regularizer added to a base loss.

    Gradient accumulation (an optimizer with ``gradient_accumulation_steps=N``, ``python -m
    car_tf.train --gradient_accumulation_steps=N``): every batch is a training step, so the EMA
    takes one update per batch (micro-batch), Cbar_t = beta Cbar_{t-1} + (1 - beta) C_t, and each
    batch's penalty sigma_max(Cbar_t diag(w)) is taken after its own update, with its gradient
    through C_t as without accumulation. The optimizer sums these gradients, the base loss's
    included, over the N batches and updates the weights once with their mean; all N batches are
    scored with the weights of the last update. The EMA's memory, about 1 / (1 - beta) steps,
    therefore counts batches, not updates: with beta = 0.9 and N = 4 it spans about 10 batches,
    i.e. 2.5 updates.

    Args:
        class_counts: training images per class (length K, all positive).
        base: name of a base loss ("ce", "ldam_drw", "logit_adjusted", "balanced_softmax",
            "decoupled") or a keras Loss whose ``call`` returns per-sample losses.
        base_kwargs: keyword arguments for a named base loss.
        spec_lambda: weight lambda of the penalty (released default 0.3).
        beta: EMA momentum (released code 0.9; the paper's setting 0.5).
        r0: offset of the frequency weights w_j = 1 / sqrt(m_j + r0).
        count_based_weights: m_j = n_j instead of n_j / N (more spread between head and tail).
        temperature: tau of the softmax in the surrogate (``spec_temp``).
        margin: gamma of the paper's gate sigmoid(gamma + f_i - f_j) (released code 0).
        differentiable_gate: let gradient through the sigmoid gate (released code: no).
        ema_init: "first_batch" (released code: Cbar_1 = sg(C_1)) or "zeros" (paper: Cbar_0 = 0).
        spectral_method: "svd", "power" or "auto" (SVD up to ``svd_max_classes`` classes, default
            100: above that the warm-started power iteration is faster and as exact).
        power_iterations: at most this many power-iteration passes over the EMA per step (half
            rounds, A V or A^T U of a block of 4 vectors, warm-started from the previous step's).
        power_tolerance: passes run while one more would raise sigma by more than this fraction
            (the default 3e-6 keeps sigma within 1e-4 of an SVD, near-identity confusion matrices
            included).
        label_classes: for soft labels, how many of each row's heaviest classes it counts toward.
        sparse_ema_entries: None (default) keeps the dense K x K EMA; a number m keeps each true
            class's m largest confusions and the mass of the others (``SparseCARState``), for
            label spaces where one K x K matrix does not fit: an approximation whose error
            README measures.

    Sample weights (``model.fit(..., sample_weight=...)``, or ``class_weight``): Keras weights each
    sample's loss, the penalty added to it included, as for any loss; beyond that a sample's weight
    multiplies its share of the batch confusion C_t, whose column j is the weighted sum of class
    j's rows divided by max(1, their total weight). A sample of weight 0 (padding) counts as if it
    were not in the batch: it moves neither C_t nor the EMA. A sample of weight 2 counts as two
    copies of it, and weights that scale a whole class alike leave its column as it is while their
    total is at least 1. The dense and the sparse EMA follow the same rule.

    Soft labels count toward their ``label_classes`` heaviest classes in proportion to their mass;
    of classes of equal mass (label smoothing's light classes) the lowest class ids are taken, so
    TensorFlow, JAX and PyTorch choose the same classes and give the same loss.
    """

    def __init__(
        self,
        class_counts,
        base="ce",
        base_kwargs=None,
        spec_lambda=CARSettings.spec_lambda,
        beta=CARSettings.spec_beta,
        r0=CARSettings.spec_r0,
        count_based_weights=CARSettings.spec_count_weights,
        temperature=CARSettings.spec_temp,
        margin=CARSettings.spec_margin,
        differentiable_gate=CARSettings.spec_differentiable_gate,
        ema_init=CARSettings.spec_ema_init,
        spectral_method=CARSettings.spectral_method,
        svd_max_classes=spectral.SVD_MAX_CLASSES,
        power_iterations=CARSettings.power_iterations,
        power_tolerance=CARSettings.power_tolerance,
        label_classes=2,
        sparse_ema_entries=None,
        name="car_loss",
        **kwargs,
    ):
        """Checks every option (the class docstring says what each means) before storing it: long
        because each bad value gets its own sentence."""
        super().__init__(name=name, **kwargs)
        counts = checked_class_counts(class_counts)
        if not spec_lambda >= 0.0:  # also refuses NaN
            raise ValueError(
                f"spec_lambda={spec_lambda} must be a number >= 0; use 0.3 (the released default)."
            )
        if not (power_iterations >= 1 and power_tolerance > 0.0):
            raise ValueError(
                f"power_iterations={power_iterations} and power_tolerance={power_tolerance} must be "
                "positive; use the defaults 20 and 3e-6."
            )
        if ema_init not in EMA_INITS:
            raise ValueError(f"ema_init={ema_init!r} is not known; use one of {EMA_INITS}.")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta={beta} must lie in [0, 1); the released default is 0.9.")
        self.class_counts = counts
        self.num_classes = int(counts.size)
        self.base_kwargs = dict(base_kwargs or {})
        if isinstance(base, str):
            self.base_name = base
            self.base = get_base_loss(base, counts, **self.base_kwargs)
        else:
            self.base_name = None
            self.base = base
        self.spec_lambda = float(spec_lambda)
        self.beta = float(beta)
        self.r0 = float(r0)
        self.count_based_weights = bool(count_based_weights)
        self.temperature = float(temperature)
        self.margin = float(margin)
        self.differentiable_gate = bool(differentiable_gate)
        self.ema_init = ema_init
        self.spectral_method = spectral.resolve_method(
            spectral_method, self.num_classes, svd_max_classes
        )
        self.requested_spectral_method = spectral_method
        self.svd_max_classes = int(svd_max_classes)
        self.power_iterations = int(power_iterations)
        self.power_tolerance = float(power_tolerance)
        self.label_classes = int(label_classes)
        self.sparse_ema_entries = checked_sparse_entries(sparse_ema_entries, self.num_classes)
        self.weights = np.asarray(
            confusion.frequency_weights(counts, self.r0, self.count_based_weights), np.float32
        )
        self.state = None
        self._sample_weight = None  # the weights of the batch being scored, while __call__ runs

    def __call__(self, y_true, y_pred, sample_weight=None):
        """Keras's weighted, reduced loss; ``sample_weight`` also weights each sample's share of
        the batch confusion (a sample of weight 0 does not count in it: see the class docstring)."""
        self._sample_weight = sample_weight
        try:
            return super().__call__(y_true, y_pred, sample_weight=sample_weight)
        finally:
            self._sample_weight = None

    def call(self, y_true, y_pred):
        logits = ops.cast(y_pred, "float32")
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"the model outputs {logits.shape[-1]} logits but CARLoss has {self.num_classes} "
                "class counts; pass one count per class of the model's output."
            )
        y_true = _checked_labels(y_true, self.num_classes)  # before any gather by label
        per_sample = ops.cast(self.base.call(y_true, logits), "float32")
        if in_symbolic_build():
            # Keras's shape-only build pass (under a strategy, before callbacks run; in the
            # cross-replica context under MultiWorkerMirroredStrategy): no state is read or changed.
            return per_sample
        if self.state is None:
            raise ValueError(
                "CARLoss has no state on the model; pass car_tf.CARCallback(loss) to model.fit, "
                "or call car_tf.attach_car_state(model, loss) before training."
            )
        sigma = self.penalty(logits, y_true, self._sample_weight)  # NaN logits: a NaN loss, as without CAR
        return per_sample + read(self.state.spec_lambda) * sigma

    def penalty(self, logits, labels, sample_weight=None):
        """sigma_max of the frequency-weighted EMA confusion; updates the state as a side effect.

        ``sample_weight`` [B] weights each sample's rows of the batch confusion (0: left out).

        The K x K work is forward-only and touches the matrix only where it must: the EMA update
        rescales and adds the batch's columns (O(K * B)), and so do the products A V, A^T U of the
        power iteration's pair; passes over the EMA run only while sigma has not
        converged to ``power_tolerance``. sigma is a function of this batch's contribution rows
        through Cbar_t = beta sg(Cbar_{t-1}) + (1 - beta) C_t, so its gradient is applied to the rows
        directly: d sigma / d contrib[q, i] = (1 - beta) u_i v_j w_j / max(1, mass_j) for a row of
        true class j (u, v the top singular vectors of A). No K x K gradient is formed.
        """
        state = self.state
        contrib, ids, weights = confusion.contributions(
            logits,
            labels,
            temperature=self.temperature,
            margin=self.margin,
            differentiable_gate=self.differentiable_gate,
            label_classes=self.label_classes,
            sample_weight=sample_weight,
        )
        # Every replica builds the same global C_t from all replicas' rows.
        all_contrib, all_ids, all_weights = all_gather([ops.stop_gradient(contrib), ids, weights])
        scale, mass = confusion.column_scales(all_ids, all_weights, self.num_classes)
        columns = all_contrib * scale[:, None]  # C_t's columns, one row per membership
        initialized = 1.0 if self.ema_init == "zeros" else read(state.initialized)
        updating = ops.cast(read(state.updating), "float32")
        # Evaluation (updating = 0) scores the stored EMA and changes no state.
        decay, weight = confusion.ema_coefficients(self.beta, initialized, updating)
        frequency = ops.convert_to_tensor(self.weights)
        if self.spectral_method == "svd":
            state.update_ema(columns, all_ids, decay, weight, updating)
            a = state.ema_matrix() * frequency[None, :]
            u, v = spectral.top_singular_vectors_svd(a)
            sigma = spectral.spectral_norm(a, u, v)
        else:
            u, v, sigma = self._power_step(state, columns, all_ids, decay, weight, updating)
        state.initialized.assign(ops.maximum(read(state.initialized), updating))
        state.last_sigma.assign(ops.where(updating > 0, sigma, read(state.last_sigma)))
        state.sigma_sum.assign_add(updating * sigma)
        state.sigma_count.assign_add(updating)

        # First step of the released code (sg(C_1)) and evaluation: no gradient.
        grad_scale = (1.0 - self.beta) * ops.cast(initialized, "float32") * updating
        per_class = grad_scale * v * frequency / ops.maximum(mass, 1.0)  # [K], by true class
        # sum over rows q and classes i of contrib[q, i] u_i per_class[class of q], as a product
        # with u, so that the only B x K work of the gradient is the outer product it implies.
        row_weight = ops.stop_gradient(ops.take(per_class, ids))
        along_u = ops.matmul(contrib, ops.stop_gradient(u)[:, None])[:, 0]  # [B*m]
        # Keras divides each replica's loss by the replica count; the rows of every replica
        # reach sigma, so each replica's share of the gradient is scaled back up.
        linear = replica_count() * ops.sum(along_u * row_weight)
        return ops.stop_gradient(sigma) + linear - ops.stop_gradient(linear)

    def _power_step(self, state, columns, ids, decay, weight, updating):
        """Updates the EMA; (u, v, sigma) of A = Cbar diag(w) after it, warm-started.

        A V and A^T U follow the EMA's change (the batch's columns only), then passes over the
        EMA run while sigma has not converged to the tolerance (none during evaluation).
        """
        frequency = ops.convert_to_tensor(self.weights)[:, None]
        u, v = read(state.power_u), read(state.power_v)
        blocks = (frequency * v, u)
        change_av, change_atu = state.update_ema(columns, ids, decay, weight, updating, blocks=blocks)
        decay = ops.cast(decay, "float32")
        av = decay * read(state.power_av) + change_av
        atu = decay * read(state.power_atu) + frequency * change_atu

        def matvec(x):
            return state.ema_times(frequency * x)

        def rmatvec(y):
            return frequency * state.ema_transpose_times(y)

        passes = self.power_iterations * ops.cast(updating, "int32")
        u, v, av, atu, passes = spectral.power_iteration(
            matvec, rmatvec, u, v, av, atu, self.power_tolerance, passes
        )
        state.power_passes.assign_add(ops.cast(passes, "float32"))
        for variable, value in zip(
            (state.power_u, state.power_v, state.power_av, state.power_atu), (u, v, av, atu)
        ):
            variable.assign(value)
        return spectral.ritz_pair(u, v, av)

    def get_config(self):
        config = super().get_config()
        config.update(
            class_counts=self.class_counts.tolist(),
            base=self.base_name or keras.saving.serialize_keras_object(self.base),
            base_kwargs=self.base_kwargs,
            spec_lambda=self.spec_lambda,
            beta=self.beta,
            r0=self.r0,
            count_based_weights=self.count_based_weights,
            temperature=self.temperature,
            margin=self.margin,
            differentiable_gate=self.differentiable_gate,
            ema_init=self.ema_init,
            spectral_method=self.requested_spectral_method,
            svd_max_classes=self.svd_max_classes,
            power_iterations=self.power_iterations,
            power_tolerance=self.power_tolerance,
            label_classes=self.label_classes,
            sparse_ema_entries=self.sparse_ema_entries,
        )
        return config

    @classmethod
    def from_config(cls, config):
        if isinstance(config.get("base"), dict):
            config = {**config, "base": keras.saving.deserialize_keras_object(config["base"])}
        return cls(**config)


FRACTIONAL_LABEL = (
    "CARLoss got a hard label that is not a whole number (such as 1.5); pass class ids (0, 1, ...), "
    "or one-hot or soft labels of shape [batch, K]."
)


def _checked_labels(y_true, num_classes):
    """Integer labels checked to lie in [0, K) before anything indexes by them; soft labels as given.

    Float hard labels must be whole numbers: the cast to int32 would floor 1.5 to class 1 without a
    word. The check costs one comparison per label, and none for integer labels.
    """
    y_true = ops.convert_to_tensor(y_true)
    if len(y_true.shape) == 2 and y_true.shape[-1] == num_classes:
        return y_true
    if "float" in keras.backend.standardize_dtype(y_true.dtype):
        y_true = stop_unless(ops.all(ops.equal(y_true, ops.floor(y_true))), FRACTIONAL_LABEL, y_true)
    return checked_labels(y_true, num_classes)

