"""ConCutMix as the trainer sees it: its tf.data stage on the training stream and ConCutMixModel
around the classifier (its loss: logit-adjusted CE, as released)."""

import dataclasses

from car_tf.concutmix.released import CIFAR
from car_tf.method import Method, Variant, setting


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConCutMixSettings:
    """The released CIFAR-LT values (README, "Other methods"); ConCutMix is Pan et al., TIP 2024,
    arXiv 2407.04911."""

    ccm_alpha: float = setting(CIFAR["alpha"], help="Weight of the classification term.")
    ccm_beta: float = setting(CIFAR["beta"], help="Weight of the balanced contrastive term.")
    ccm_temperature: float = setting(CIFAR["temperature"], help="Contrastive temperature.")
    ccm_top_k: int = setting(CIFAR["top_k"], help="Nearest prototypes in the semantic label.")
    ccm_omega: float = setting(CIFAR["omega"], help="Rectification strength omega.")
    ccm_l_d_warm: int = setting(CIFAR["l_d_warm"], help="Epochs before label rectification starts.")
    ccm_projection_dim: int = setting(CIFAR["projection_dim"], help="Projection-head output size.")
    ccm_cutmix_prob: float = setting(CIFAR["cutmix_prob"], help="Probability that a batch is mixed.")


class ConCutMixMethod(Method):
    name = "concutmix"
    settings_class = ConCutMixSettings
    needs_tensorflow = "mixes its batches in a tf.data stage and rectifies labels in a TensorFlow train step"
    needs_images = "mixes images and projects them through the backbone"
    serializable_modules = ("car_tf.concutmix.model",)

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

    def compare_variants(self, base_losses):
        """car_concutmix: CAR on logit-adjusted CE with the ConCutMix stage (no post-hoc rows)."""
        return {"car_concutmix": Variant(("--method=car", "--concutmix", "--base_loss=logit_adjusted"),
                                         posthoc=False)}


CONCUTMIX = ConCutMixMethod()
