"""Training methods by name: what each one adds to the trainer.

A method is a folder of car_tf (``car/``, ``concutmix/``, ``decoupled/``) whose ``method.py``
defines a ``Method`` subclass: its settings dataclass and the hooks below. The trainer calls the
hooks of the run's active methods in registry order and knows no method by name. Adding a method
means adding its folder and one line to ``registry()``.
"""

from car_tf.losses.registry import BASE_LOSSES


class Method:
    """A method's contributions; every hook defaults to adding nothing.

    ``settings`` is the method's own configuration dataclass (``settings_class``); ``config`` the
    whole TrainConfig.
    """

    name = ""
    settings_class = None
    needs_tensorflow = ""  # why the method trains only under the TensorFlow backend ("": it runs on any)
    needs_images = ""  # why the method cannot train a head on cached features ("": it can)

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


def registry():
    """{name: Method} of every method, in the order their hooks apply."""
    from car_tf.car.method import CAR
    from car_tf.concutmix.method import CONCUTMIX
    from car_tf.decoupled.method import DECOUPLED

    return {method.name: method for method in (DECOUPLED, CAR, CONCUTMIX)}


def method_names():
    """Every accepted --method: the base losses and the registered methods."""
    return tuple(dict.fromkeys([*BASE_LOSSES, *registry()]))


def effective_base_loss(config):
    """The base loss the run trains with."""
    choice = config.choice.method
    if choice in BASE_LOSSES:
        return choice
    method = registry().get(choice)
    if method is None:
        raise ValueError(f"--method={choice!r} is not known; use one of {', '.join(method_names())}.")
    return method.base_loss(config) or config.loss.base_loss


def active_methods(config):
    """[(Method, its settings)] of the run, in registry order."""
    base = effective_base_loss(config)
    return [
        (method, config.settings[name])
        for name, method in registry().items()
        if method.is_active(config, base)
    ]


def default_settings():
    """{name: settings dataclass with its defaults} of every registered method."""
    return {name: method.settings_class() for name, method in registry().items()}
