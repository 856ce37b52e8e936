"""ConCutMixModel: a classifier trained with rectified balanced CutMix + BCL (Pan et al., TIP 2024, arXiv 2407.04911)."""
import keras
import numpy as np
from keras import ops

from car_tf.backend import import_tensorflow
from car_tf.distribute import all_gather, replica_count, replica_id, strategy_replica_count
from car_tf.car.carrier import CarriesCARState
from car_tf.concutmix.contrastive import balanced_contrastive_loss
from car_tf.concutmix.released import CIFAR
from car_tf.concutmix.rectification import (
    class_prototypes,
    rectification_weight,
    rectify,
    semantic_label,
)
from car_tf.keras_compat import aggregated_layer_loss, loss_tracker
from car_tf.losses.cross_entropy import checked_class_counts, target_distribution
from car_tf.models.registry import features_model
from car_tf.ops import l2_normalize

tf = import_tensorflow(__name__)


def _per_global_batch(loss):
    """A replica's loss times the replica count: the global batch's loss, as Keras reports it.

    Keras divides each replica's loss by the replica count so that the summed gradients are the
    global batch's; the trackers undo that, as Keras's own train_step does.
    """
    return loss * tf.cast(strategy_replica_count(), loss.dtype)


def projection_head(input_dim, hidden_dim, output_dim, name):
    """BCL's MLP head: Dense(hidden) - BatchNorm - ReLU - Dense(output).

    The BatchNorm is synchronised across replicas so that its statistics, and hence the training
    step, do not depend on how the global batch is split.
    """
    head = keras.Sequential(
        [
            keras.layers.Dense(hidden_dim, name="hidden"),
            keras.layers.BatchNormalization(synchronized=True, name="norm"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Dense(output_dim, name="out"),
        ],
        name=name,
    )
    head.build((None, input_dim))
    return head


@keras.saving.register_keras_serializable(package="car_tf")
class ConCutMixModel(CarriesCARState, keras.Model):
    """Trains ``classifier`` on concutmix_stage batches; calling it runs the plain classifier.

    Each step feeds [mixed; view1; view2] through the classifier in one batch. The mixed images'
    logits get the compiled loss (e.g. LogitAdjustedLoss or CARLoss, per-sample, soft labels) on
    the rectified label; the views' projections get BCL's balanced contrastive loss against one
    prototype per class. Total = alpha * CE + beta * contrastive (+ any losses the layers add,
    e.g. regularizers, once). As in BCL, the prototypes come
    from a second head of the same shape (``prototype_head``) applied to the classifier's weights.
    The epoch that gates rectification comes with the data (the stage's ``epoch`` entry), so a
    resumed run needs no extra state. Evaluation, prediction and export use ``.classifier``.
    ``model.save`` keeps both heads and, under CARLoss, the model's ``car_state``.

    Args:
        classifier: functional keras.Model (images -> logits) with layers "features" ([B, D]) and
            "classifier" (``kernel`` [D, K]).
        num_classes: K.
        class_counts: training images per class (length K, all >= 1).
        projection_dim: output width P of the projection heads.
        hidden_dim: hidden width of the heads (default D, as in BCL).
        alpha, beta: weights of the CE and contrastive terms.
        temperature: BCL temperature.
        top_k: classes kept in the semantic label.
        omega: rectification scale; the semantic label's share is w * omega.
        l_d_warm: first epoch at which mixed labels are rectified.
    """

    def __init__(
        self,
        classifier,
        num_classes,
        class_counts,
        projection_dim=CIFAR["projection_dim"],
        hidden_dim=None,
        alpha=CIFAR["alpha"],
        beta=CIFAR["beta"],
        temperature=CIFAR["temperature"],
        top_k=CIFAR["top_k"],
        omega=CIFAR["omega"],
        l_d_warm=CIFAR["l_d_warm"],
        **kwargs,
    ):
        super().__init__(**kwargs)
        layer_names = {layer.name for layer in classifier.layers}
        if not {"features", "classifier"} <= layer_names:
            raise ValueError(
                "the classifier needs layers named 'features' and 'classifier'; build it with "
                "car_tf.models.create_model or name those layers so."
            )
        kernel_shape = tuple(classifier.get_layer("classifier").kernel.shape)
        counts = checked_class_counts(class_counts)
        if kernel_shape[1] != num_classes or counts.size != num_classes:
            raise ValueError(
                f"num_classes={num_classes}, but the classifier kernel is {kernel_shape} and "
                f"class_counts has {counts.size} entries; make all three agree."
            )
        self.classifier = classifier
        self.num_classes = int(num_classes)
        self.class_counts = counts.astype(np.int64)
        self.projection_dim = int(projection_dim)
        self.hidden_dim = int(hidden_dim or kernel_shape[0])
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.omega = float(omega)
        self.l_d_warm = int(l_d_warm)
        self.embedder = features_model(classifier)
        head_shape = (kernel_shape[0], self.hidden_dim, self.projection_dim)
        self.projection_head = projection_head(*head_shape, name="projection_head")
        self.prototype_head = projection_head(*head_shape, name="prototype_head")
        self.ce_tracker = keras.metrics.Mean(name="ce_loss")
        self.contrastive_tracker = keras.metrics.Mean(name="contrastive_loss")
        self.built = True

    def call(self, inputs, training=False):
        images = inputs["mixed"] if isinstance(inputs, dict) else inputs
        return self.classifier(images, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        # Keras builds the compiled loss and metrics from a first batch; a stage batch is a dict
        # with no separate y, so its area label (metrics: label A) stands in for the labels.
        if y is None and isinstance(x, dict):
            y = x["area_label"]
        return super().compute_loss(x, y, y_pred, sample_weight, training=training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if y is None and isinstance(x, dict):
            y = x["label_a"]
        return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def prototypes(self, training=False):
        """The L2-normalised class prototypes [K, P]."""
        kernel = self.classifier.get_layer("classifier").kernel
        return class_prototypes(kernel, self.prototype_head, training=training)

    def train_step(self, data):
        batch, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        size = tf.shape(batch["mixed"])[0]
        images = tf.concat([batch["mixed"], batch["view1"], batch["view2"]], axis=0)
        label_a = tf.cast(batch["label_a"], tf.int32)
        with tf.GradientTape() as tape:
            features, logits = self.embedder(images, training=True)
            projections = l2_normalize(
                ops.cast(self.projection_head(features, training=True), "float32")
            )
            prototypes = self.prototypes(training=True)
            soft_label = self._rectified_label(batch, projections[:size], prototypes)
            mixed_logits = logits[:size]
            compiled = self.compute_loss(
                x=batch, y=soft_label, y_pred=mixed_logits, training=True
            )
            # compute_loss also adds the layers' own losses; those count once, not alpha times.
            layer_losses = sum(aggregated_layer_loss(self, term) for term in self.losses)
            ce = compiled - layer_losses
            contrastive = self._contrastive(projections[size:], label_a, prototypes)
            loss = self.alpha * ce + self.beta * contrastive + layer_losses
            scaled = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
        self.ce_tracker.update_state(_per_global_batch(ce), sample_weight=size)
        self.contrastive_tracker.update_state(_per_global_batch(contrastive), sample_weight=size)
        loss_tracker(self).update_state(_per_global_batch(loss), sample_weight=size)
        # Compiled metrics (e.g. accuracy) score the mixed images against their label A.
        return self.compute_metrics(batch, label_a, mixed_logits)

    def test_step(self, data):
        images, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        logits = self.classifier(images, training=False)
        target = target_distribution(labels, self.num_classes)
        loss = self.compute_loss(
            x=images, y=target, y_pred=logits, sample_weight=sample_weight, training=False
        )
        loss_tracker(self).update_state(_per_global_batch(loss), sample_weight=tf.shape(images)[0])
        results = self.compute_metrics(images, labels, logits, sample_weight=sample_weight)
        # The two training terms are not computed here; drop them rather than report zeros.
        return {
            name: value
            for name, value in results.items()
            if name not in (self.ce_tracker.name, self.contrastive_tracker.name)
        }

    def _rectified_label(self, batch, mixed_projections, prototypes):
        semantic = semantic_label(mixed_projections, prototypes, self.top_k)
        counts = tf.constant(self.class_counts, tf.float32)
        weight = rectification_weight(
            batch["lam"],
            tf.gather(counts, batch["label_a"]),
            tf.gather(counts, batch["label_b"]),
            self.class_counts,
        )
        return rectify(
            batch["area_label"],
            semantic,
            weight,
            self.omega,
            batch["mixed_flag"],
            batch["epoch"],
            self.l_d_warm,
        )

    def _contrastive(self, view_projections, label_a, prototypes):
        labels = tf.concat([label_a, label_a], axis=0)
        replicas = replica_count()
        keys = {}
        if replicas > 1:
            # Every replica contrasts its anchors with the whole global batch, as one device would.
            # Gathered one at a time: the int32 labels live on the host, the features do not.
            keys = {
                "key_features": all_gather(view_projections),
                "key_labels": all_gather(labels),
                "anchor_offset": replica_id() * tf.shape(labels)[0],
            }
        per_sample = balanced_contrastive_loss(
            view_projections, labels, prototypes, self.temperature, **keys
        )
        # Divided by the replica count because the gradient all-reduce sums the replicas' shares.
        return ops.mean(per_sample) / replicas

    def get_config(self):
        return {
            **super().get_config(),
            "classifier": keras.saving.serialize_keras_object(self.classifier),
            "num_classes": self.num_classes,
            "class_counts": self.class_counts.tolist(),
            "projection_dim": self.projection_dim,
            "hidden_dim": self.hidden_dim,
            "alpha": self.alpha,
            "beta": self.beta,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "omega": self.omega,
            "l_d_warm": self.l_d_warm,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["classifier"] = keras.saving.deserialize_keras_object(
            config["classifier"], custom_objects
        )
        return super().from_config(config, custom_objects)
