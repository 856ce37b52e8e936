"""The decoupled method as the trainer sees it: a cosine head, the margin loss, its two terms and
per-group diagnostics (README, "Other methods")."""

import dataclasses
from typing import Literal

from car_tf.decoupled import margin, terms
from car_tf.method import Method, setting


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoupledSettings:
    """Weights and forms of the three terms (canonical forms; see car_tf.decoupled.terms)."""

    arc_margin: float = setting(margin.DEFAULT_MARGIN, help="Additive angular margin m of the decoupled loss.")
    uniformity_weight: float = setting(
        terms.DEFAULT_UNIFORMITY_WEIGHT, help="Weight of the hyperspherical-uniformity term (decoupled loss).")
    uniformity: Literal["mhe", "gaussian"] = setting("mhe", help="Uniformity term: energy or Gaussian potential.")
    feature_norm_weight: float = setting(
        terms.DEFAULT_FEATURE_NORM_WEIGHT, help="Weight of the feature-norm term (decoupled loss).")
    target_norm: float = setting(terms.DEFAULT_TARGET_NORM, help="Target feature norm of the decoupled loss.")
    feature_norm: Literal["hinge", "ring"] = setting("hinge", help="Feature-norm term form.")


class DecoupledMethod(Method):
    """Active whenever the run's base loss is the decoupled margin loss (alone or under CAR)."""

    name = "decoupled"
    settings_class = DecoupledSettings
    rebuilds_model = "clones the model to add its uniformity and feature-norm terms"
    serializable_modules = ("car_tf.decoupled.terms",)

    def is_active(self, config, base_loss):
        return base_loss == self.name

    def classifier_head(self, config):
        return "cosine", config.model.cosine_scale  # the margin loss scales cosines itself

    def base_loss_options(self, settings):
        return {"margin": settings.arc_margin}

    def wrap_classifier(self, settings, classifier):
        return terms.attach_decoupled_terms(
            classifier,
            uniformity_weight=settings.uniformity_weight,
            feature_norm_weight=settings.feature_norm_weight,
            target_norm=settings.target_norm,
            uniformity=settings.uniformity,
            feature_norm=settings.feature_norm,
        )

    def callbacks(self, settings, test_dataset, counts):
        from car_tf.decoupled.diagnostics import DecoupledDiagnostics

        return [DecoupledDiagnostics(test_dataset, counts)]

    def report(self, settings, predictor, test_dataset, counts):
        from car_tf.decoupled.diagnostics import decoupled_quantities

        # As car_tf.evaluation.evaluate.decoupled_report, without importing the evaluation modules,
        # which import the registry back (to load saved models).
        model = getattr(predictor, "model", None)
        names = {layer.name for layer in getattr(model, "layers", ())}
        if not {"features", "classifier"} <= names:
            return {"decoupled": None}
        return {"decoupled": decoupled_quantities(model, test_dataset, counts)}


DECOUPLED = DecoupledMethod()
