"""CAR as the trainer sees it: CARLoss around the base loss, its state on the model and
CARCallback (README, "CAR in your own Keras code")."""

from car_tf.car.settings import CARSettings
from car_tf.method import Method, Variant


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
