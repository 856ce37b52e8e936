"""CAR as the trainer sees it: CARLoss around the base loss, its state on the model and
CARCallback (README, "CAR in your own Keras code")."""

import dataclasses
from typing import Literal

from car_tf.method import Method, Variant, setting


@dataclasses.dataclass(frozen=True, kw_only=True)
class CARSettings:
    """CARLoss's options under their command-line names (defaults: the released code's); CAR is
    from CVPR 2026, arXiv 2603.16732."""

    spec_lambda: float = setting(0.3, help="Weight lambda of the CAR penalty.")
    spec_beta: float = setting(0.9, help="EMA momentum of the confusion matrix (paper: 0.5).")
    spec_r0: float = setting(0.2, help="Offset r0 of the frequency weights.")
    spec_temp: float = setting(1.0, help="Softmax temperature of the confusion surrogate.")
    spec_margin: float = setting(0.0, help="Paper's gate margin gamma (released code: 0).")
    spec_count_weights: bool = setting(False, help="Count-based frequency weights (m_j = n_j).")
    spec_differentiable_gate: bool = setting(False, help="Let gradient through the sigmoid gate.")
    spec_ema_init: Literal["first_batch", "zeros"] = setting("first_batch", help="EMA start (code / paper).")
    spectral_method: Literal["auto", "svd", "power"] = setting("auto", help="How sigma_max is found.")
    power_iterations: int = setting(20, help="At most this many warm-started power-iteration passes per step.")
    power_tolerance: float = setting(
        3e-6, help="Power iteration stops once a pass raises sigma by less than this fraction.")
    lambda_warmup_epochs: int = setting(0, help="Epochs of linear lambda ramp-up (released code: 0).")
    # None: the dense EMA (and no entry in old run records)
    spec_sparse_ema_entries: int | None = setting(
        None, help="Sparse EMA: keep each class's N largest confusions (unset: dense K x K).")

    def __post_init__(self):
        if self.lambda_warmup_epochs < 0:
            raise ValueError(f"--lambda_warmup_epochs={self.lambda_warmup_epochs} must not be negative.")


class CARMethod(Method):
    name = "car"
    settings_class = CARSettings

    def wrap_loss(self, settings, loss, counts, base_loss, base_options):
        from car_tf.car.loss import CARLoss

        return CARLoss(
            counts,
            base=base_loss,
            base_kwargs=base_options,
            spec_lambda=settings.spec_lambda,
            beta=settings.spec_beta,
            r0=settings.spec_r0,
            count_based_weights=settings.spec_count_weights,
            temperature=settings.spec_temp,
            margin=settings.spec_margin,
            differentiable_gate=settings.spec_differentiable_gate,
            ema_init=settings.spec_ema_init,
            spectral_method=settings.spectral_method,
            power_iterations=settings.power_iterations,
            power_tolerance=settings.power_tolerance,
            sparse_ema_entries=settings.spec_sparse_ema_entries,
        )

    def attach(self, settings, model, loss):
        from car_tf.car.callback import CARCallback
        from car_tf.car.carrier import attach_car_state

        attach_car_state(model, loss)  # before restoring, so the checkpoint's EMA is loaded
        return [CARCallback(loss, lambda_warmup_epochs=settings.lambda_warmup_epochs)]

    def compare_variants(self, base_losses):
        """car (CAR on CE) and car_<base> on every other base loss, each paired with its base."""
        return {
            "car": Variant(("--method=car",), paired_with="ce"),
            **{f"car_{base}": Variant(("--method=car", f"--base_loss={base}"), paired_with=base)
               for base in base_losses if base != "ce"},
        }


CAR = CARMethod()
