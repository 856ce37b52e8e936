"""The base class of a training method: what a method may add to the trainer (a leaf module).

The registry of methods is car_tf.training.methods; each method's folder defines a subclass.
"""


class Method:
    """A method's contributions; every hook defaults to adding nothing.

    ``settings`` is the method's own configuration dataclass (``settings_class``); ``config`` the
    whole TrainConfig.
    """

    name = ""
    settings_class = None
    needs_tensorflow = ""  # why the method trains only under the TensorFlow backend ("": it runs on any)
    needs_images = ""  # why the method cannot train a head on cached features ("": it can)
    rebuilds_model = ""  # how the method rebuilds the classifier it wraps ("": it wraps it as it is)

    def is_active(self, config, base_loss):
        """Whether the run uses this method, given its choice and its effective base loss."""
        return config.choice.method == self.name

    def base_loss(self, config):
        """The base loss this method trains with when it is the chosen --method (None: --base_loss)."""
        return None

    def classifier_head(self, config):
        """(head, scale) the method needs on the classifier, or None for the configured one."""
        return None

    def base_loss_options(self, settings):
        """Keyword options the method gives its base loss."""
        return {}

    def wrap_classifier(self, settings, classifier):
        return classifier

    def wrap_loss(self, settings, loss, counts, base_loss, base_options):
        return loss

    def wrap_model(self, settings, model, classifier, counts):
        return model

    def compile_metrics(self, settings):
        """Metrics to compile, or None to keep the default accuracy."""
        return None

    def attach(self, settings, model, loss):
        """Called in the strategy scope before the checkpoint is restored; returns callbacks."""
        return []

    def callbacks(self, settings, test_dataset, counts):
        return []

    def batch_hook(self, settings, train, stream):
        """A ``batch_hook`` for the training stream (``stream``: train_dataset's keywords), or None."""
        return None

    def report(self, settings, predictor, test_dataset, counts):
        """Entries the method adds to the final report."""
        return {}
