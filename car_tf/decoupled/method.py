"""The decoupled method as the trainer sees it: a cosine head, the margin loss, its two terms and
per-group diagnostics (README, "Other methods")."""

import dataclasses

from car_tf.decoupled import terms
from car_tf.training.method import Method


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoupledSettings:
    """Weights and forms of the three terms (canonical forms; see car_tf.decoupled.terms)."""

    arc_margin: float = 0.2
    uniformity_weight: float = terms.DEFAULT_UNIFORMITY_WEIGHT
    uniformity: str = "mhe"
    feature_norm_weight: float = terms.DEFAULT_FEATURE_NORM_WEIGHT
    target_norm: float = terms.DEFAULT_TARGET_NORM
    feature_norm: str = "hinge"


class DecoupledMethod(Method):
    """Active whenever the run's base loss is the decoupled margin loss (alone or under CAR)."""

    name = "decoupled"
    settings_class = DecoupledSettings
    rebuilds_model = "clones the model to add its uniformity and feature-norm terms"

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
        from car_tf.evaluation.evaluate import decoupled_report

        return {"decoupled": decoupled_report(predictor, test_dataset, counts)}


DECOUPLED = DecoupledMethod()
