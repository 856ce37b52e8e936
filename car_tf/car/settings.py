"""CAR's settings, written once: the command-line flags of ``car_tf.train`` (car_tf.car.method)
and the defaults of CARLoss, CARState, SparseCARState and CARCallback all come from here."""

import dataclasses
from typing import Literal

from car_tf.car import spectral
from car_tf.method import setting


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
        spectral.POWER_TOLERANCE, help="Power iteration stops once a pass raises sigma by less than this fraction.")
    lambda_warmup_epochs: int = setting(0, help="Epochs of linear lambda ramp-up (released code: 0).")
    # None: the dense EMA (and no entry in old run records)
    spec_sparse_ema_entries: int | None = setting(
        None, help="Sparse EMA: keep each class's N largest confusions (unset: dense K x K).")

    def __post_init__(self):
        if self.lambda_warmup_epochs < 0:
            raise ValueError(f"--lambda_warmup_epochs={self.lambda_warmup_epochs} must not be negative.")
