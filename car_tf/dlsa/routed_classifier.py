"""The whole DLSA stack as one Keras model: features [B, D] -> logits [B, K].

Every flow and classifier runs on every sample (all are cheap next to a backbone) and the
routing is a chain of ``where`` selections, so the graph has static shapes and exports to a
SavedModel and ONNX. Sample b gets the logits of the first filter stage s whose flow gives
log p(x_b) >= threshold_s, else those of the final classifier -- exactly the routing of
``car_tf.dlsa.cascade.route``.
"""

import keras
from keras import ops

from car_tf.dlsa.classifiers import StageClassifier
from car_tf.dlsa.flow import MaskedAutoregressiveFlow


@keras.saving.register_keras_serializable(package="car_tf")
class DLSARoutedClassifier(keras.Model):
    """Flows + thresholds + cluster priors + stage classifiers, routed per sample.

    Args:
        num_classes: K.
        feature_dim: D, the width of the backbone's "features" layer.
        depth: number of filter stages (depth + 1 classifiers).
        flow_config: keyword arguments of every ``MaskedAutoregressiveFlow`` (the seed is ignored:
            weights, prior means included, come from training or from the saved file).
    Build one from trained parts with ``from_trained``; ``route(features)`` gives stage ids.
    """

    def __init__(self, num_classes, feature_dim, depth, flow_config=None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.depth = int(depth)
        self.flow_config = {k: v for k, v in dict(flow_config or {}).items() if k != "seed"}
        self.flows = [
            MaskedAutoregressiveFlow(name=f"flow_{s}", **self.flow_config) for s in range(self.depth)
        ]
        self.stage_classifiers = [
            StageClassifier(num_classes, name=f"stage_classifier_{s}") for s in range(self.depth)
        ]
        self.final_classifier = StageClassifier(num_classes, name="final_classifier")

    def build(self, input_shape):
        dim = self.feature_dim
        for flow, classifier in zip(self.flows, self.stage_classifiers):
            flow.build((None, dim))
            classifier.build(((None, dim), (None, dim + self.num_classes)))
        self.final_classifier.build(((None, dim), (None, dim)))
        self.thresholds = self.add_weight(
            shape=(self.depth,), initializer="zeros", trainable=False, name="thresholds"
        )
        num_components = self.flows[0].num_components
        self.cluster_priors = self.add_weight(
            shape=(self.depth, num_components, self.num_classes),
            initializer="zeros",
            trainable=False,
            name="cluster_priors",
        )

    @classmethod
    def from_trained(
        cls, stages, stage_classifiers, final_classifier, num_classes, feature_dim, flow_config
    ):
        """Assembles a model from ``train_cascade`` stages and trained ``StageClassifier`` s."""
        model = cls(num_classes, feature_dim, len(stages), flow_config)
        model.build((None, feature_dim))
        for s, stage in enumerate(stages):
            model.flows[s].set_weights(stage.flow.get_weights())
            model.stage_classifiers[s].set_weights(stage_classifiers[s].get_weights())
        model.final_classifier.set_weights(final_classifier.get_weights())
        model.thresholds.assign([stage.threshold for stage in stages])
        model.cluster_priors.assign([stage.cluster_prior for stage in stages])
        return model

    def _stage_outputs(self, features):
        """Per filter stage: (taken mask, logits); plus the final classifier's logits."""
        outputs, latent = [], None
        for s, (flow, classifier) in enumerate(zip(self.flows, self.stage_classifiers)):
            log_prob, latent = flow.log_prob_and_latent(features)
            prior = ops.take(self.cluster_priors[s], flow.clusters(latent), axis=0)
            logits = classifier([features, ops.concatenate([latent, prior], axis=-1)])
            outputs.append((log_prob >= self.thresholds[s], logits))
        return outputs, self.final_classifier([features, latent])

    def call(self, features):
        stage_outputs, logits = self._stage_outputs(features)
        for passes, stage_logits in reversed(stage_outputs):
            logits = ops.where(passes[:, None], stage_logits, logits)
        return logits

    def route(self, features):
        """Index of the classifier each sample goes to: int32 [B] in [0, depth]."""
        stage = ops.full(ops.shape(features)[:1], self.depth, dtype="int32")
        for s in reversed(range(self.depth)):
            log_prob, _ = self.flows[s].log_prob_and_latent(features)
            stage = ops.where(log_prob >= self.thresholds[s], s, stage)
        return stage

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            feature_dim=self.feature_dim,
            depth=self.depth,
            flow_config=self.flow_config,
        )
        return config
