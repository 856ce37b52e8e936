"""ConCutMix as the trainer sees it: its tf.data stage on the training stream and ConCutMixModel
around the classifier (its loss: logit-adjusted CE, as released)."""

import dataclasses

from car_tf.training.method import Method


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConCutMixSettings:
    """The released CIFAR-LT values (README, "Other methods")."""

    ccm_alpha: float = 2.0
    ccm_beta: float = 0.6
    ccm_temperature: float = 0.1
    ccm_top_k: int = 30
    ccm_omega: float = 20 / 255
    ccm_l_d_warm: int = 100
    ccm_projection_dim: int = 128
    ccm_cutmix_prob: float = 0.5


class ConCutMixMethod(Method):
    name = "concutmix"
    settings_class = ConCutMixSettings
    needs_tensorflow = "mixes its batches in a tf.data stage and rectifies labels in a TensorFlow train step"
    needs_images = "mixes images and projects them through the backbone"

    def is_active(self, config, base_loss):
        return config.choice.concutmix or config.choice.method == self.name

    def base_loss(self, config):
        return "logit_adjusted"

    def wrap_model(self, settings, model, classifier, counts):
        from car_tf.concutmix.model import ConCutMixModel

        return ConCutMixModel(
            model,
            num_classes=len(counts),
            class_counts=counts,
            projection_dim=settings.ccm_projection_dim,
            alpha=settings.ccm_alpha,
            beta=settings.ccm_beta,
            temperature=settings.ccm_temperature,
            top_k=settings.ccm_top_k,
            omega=settings.ccm_omega,
            l_d_warm=settings.ccm_l_d_warm,
        )

    def compile_metrics(self, settings):
        return []  # ConCutMixModel reports its own terms

    def batch_hook(self, settings, train, stream):
        from car_tf.concutmix.stage import concutmix_batch_hook

        return concutmix_batch_hook(
            train,
            recipe=stream["recipe"],
            image_size=stream["image_size"],
            seed=stream["seed"],
            cutmix_prob=settings.ccm_cutmix_prob,
            randaugment=stream["randaugment"],
        )


CONCUTMIX = ConCutMixMethod()
