"""The decoupled margin / uniformity / feature-norm method (Gao et al., CAAI TIT 2025).

``margin``: DecoupledMarginLoss (additive angular margin on a cosine classifier); ``terms``: the
hyperspherical-uniformity and feature-norm terms and ``attach_decoupled_terms``; ``diagnostics``:
classifier norm, feature norm and target cosine per many/medium/few group.
"""
from car_tf.decoupled.diagnostics import DecoupledDiagnostics, decoupled_quantities
from car_tf.decoupled.margin import DecoupledMarginLoss
from car_tf.decoupled.terms import FeatureNormPenalty, UniformityRegularizer, attach_decoupled_terms

__all__ = [
    "DecoupledDiagnostics",
    "DecoupledMarginLoss",
    "FeatureNormPenalty",
    "UniformityRegularizer",
    "attach_decoupled_terms",
    "decoupled_quantities",
]
