"""CAR as the trainer sees it: CARLoss around the base loss, its state on the model and
CARCallback (README, "CAR in your own Keras code")."""

import dataclasses

from car_tf.training.method import Method


@dataclasses.dataclass(frozen=True, kw_only=True)
class CARSettings:
    """CARLoss's options under their command-line names (defaults: the released code's)."""

    spec_lambda: float = 0.3
    spec_beta: float = 0.9
    spec_r0: float = 0.2
    spec_temp: float = 1.0
    spec_margin: float = 0.0
    spec_count_weights: bool = False
    spec_differentiable_gate: bool = False
    spec_ema_init: str = "first_batch"
    spectral_method: str = "auto"
    power_iterations: int = 20
    power_tolerance: float = 3e-6
    lambda_warmup_epochs: int = 0
    spec_sparse_ema_entries: int | None = None  # None: the dense EMA (and no entry in old run records)

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


CAR = CARMethod()
