"""The base class of a training method: what a method may add to the trainer (a leaf module).

The registry of methods is car_tf.training.methods; each method's folder defines a subclass in
its ``method.py``, with its settings dataclass (whose fields, written with ``setting``, become the
method's command-line flags).
"""

import dataclasses


def setting(default=dataclasses.MISSING, *, help, **metadata):
    """A configuration dataclass field with its flag's help text (and, in ``metadata``, its
    ``lower_bound`` / ``upper_bound``, ``choices``, ``repeated`` or ``flag``):
    ``spec_lambda: float = setting(0.3, help=...)``.

    The field's name is its flag's name (``flag="..."`` names another) and its default the flag's
    default (car_tf.flags_from_config).
    """
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass(frozen=True)
class Variant:
    """A row of ``python -m car_tf.compare``: the train flags that select it, the row it is compared
    with seed by seed (its paired difference's baseline; None: none), and whether the post-hoc
    stages (``<row>_dlsa``, ``<row>_crt``, ...) are offered on its runs."""

    flags: tuple
    paired_with: str | None = None
    posthoc: bool = True


class Method:
    """A method's contributions; every hook defaults to adding nothing.

    ``settings`` is the method's own configuration dataclass (``settings_class``: one field per
    flag, written with ``setting``); ``config`` the whole TrainConfig.

    Several methods may be active in one run (CAR on the decoupled loss with the ConCutMix stage,
    say). Their hooks compose in registry order (car_tf.training.methods), by these rules; a run
    that breaks one is refused in one sentence (before the run directory is written, except for
    ``report``, whose entries exist only at the end):

    - ``is_active``: each method decides for itself.
    - ``base_loss``: asked of the chosen ``--method`` alone; its answer replaces ``--base_loss``.
    - ``classifier_head``: the active methods that answer must agree (two different heads: refused).
    - ``base_loss_options``: merged over the active methods, over ``--base_loss``'s own options; two
      methods giving the same option: refused.
    - ``wrap_classifier``, ``wrap_loss``, ``wrap_model``: chained in registry order, each wrapping
      what the one before returned (the last registered is outermost).
    - ``compile_metrics``: at most one active method answers (two answers: refused).
    - ``attach``, ``callbacks``: concatenated in registry order.
    - ``batch_hook``: at most one active method changes the training batches (two: refused).
    - ``report``: merged into the final report; two methods giving the same entry: refused.
    - ``needs_tensorflow``, ``needs_images``, ``rebuilds_model``: any active method's reason
      refuses the run where it applies (another backend, ``--frozen_backbone``, ``--lora_rank``).

    For ``python -m car_tf.compare``, ``compare_variants`` names the method's rows and
    ``serializable_modules`` the modules whose import registers the Keras classes its saved
    models hold (car_tf.evaluation.predictors imports them before loading a model.keras).
    """

    name = ""
    settings_class = None
    needs_tensorflow = ""  # why the method trains only under the TensorFlow backend ("": it runs on any)
    needs_images = ""  # why the method cannot train a head on cached features ("": it can)
    rebuilds_model = ""  # how the method rebuilds the classifier it wraps ("": it wraps it as it is)
    serializable_modules = ()  # modules registering the Keras classes a model.keras of its runs holds

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

    def compare_variants(self, base_losses):
        """{row name: Variant} of this method's rows in ``python -m car_tf.compare`` (``base_losses``:
        the base loss names). Default: one row named after the method, ``--method=<name>``."""
        return {self.name: Variant((f"--method={self.name}",))}
