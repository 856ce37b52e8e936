"""Training methods by name: what each one adds to the trainer.

A method is a folder (``car/``, ``concutmix/``, ``decoupled/``) whose ``method.py`` defines a
``Method`` subclass (car_tf.method) and an instance of it: its settings dataclass and its
hooks. The trainer calls the hooks of the run's active methods in registry order and knows no
method by name; the command lines take their flags (car_tf.train), their rows (car_tf.compare) and
the classes a saved model may hold (car_tf.evaluation.predictors) from here.

Adding a method means adding its folder and one line: ``"package.method:INSTANCE"`` in
``METHODS`` for a method of car_tf, or in the environment variable ``CAR_TF_METHODS`` (entries
separated by commas, their packages on PYTHONPATH) for one outside it. Those from the environment
come after car_tf's own, and processes a command starts (car_tf.compare's runs) inherit them.
"""

import importlib
import os

from car_tf.losses.registry import BASE_LOSSES
from car_tf.method import Method, Variant

# The registered methods, in the order their hooks apply: "module:attribute" of each Method.
METHODS = (
    "car_tf.decoupled.method:DECOUPLED",
    "car_tf.car.method:CAR",
    "car_tf.concutmix.method:CONCUTMIX",
)
PLUGINS_ENV = "CAR_TF_METHODS"
# Train flags a base loss's row of car_tf.compare adds to --method=<loss>.
BASE_LOSS_ROW_FLAGS = {"ldam_drw": ("--lr_decay_factor=0.01",)}  # the LDAM code's decay


def registered_entries():
    """The "module:attribute" entries of every registered method: METHODS, then $CAR_TF_METHODS."""
    extra = [entry.strip() for entry in os.environ.get(PLUGINS_ENV, "").split(",") if entry.strip()]
    return [*METHODS, *extra]


def load_method(entry):
    """The Method instance an entry "module:attribute" names; ValueError says what is wrong."""
    module_name, colon, attribute = entry.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"{PLUGINS_ENV} entry {entry!r} must read module:attribute, e.g. "
                         "my_method.method:MY_METHOD.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"the method {entry} cannot be imported ({error}); put its package's folder on "
                         f"PYTHONPATH or correct {PLUGINS_ENV}.") from None
    method = getattr(module, attribute, None)
    if not isinstance(method, Method) or not method.name or method.settings_class is None:
        raise ValueError(f"{entry} is not a Method instance with a name and a settings_class "
                         "(car_tf.method.Method); point the entry at one.")
    return method


def registry():
    """{name: Method} of every registered method, in the order their hooks apply."""
    found = {}
    for entry in registered_entries():
        method = load_method(entry)
        if method.name in found and found[method.name] is not method:
            raise ValueError(f"two registered methods are called {method.name!r}; rename one of them.")
        found[method.name] = method
    return found


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
    active = []
    for name, method in registry().items():
        if method.is_active(config, base):
            if name not in config.settings:
                raise ValueError(f"the configuration holds no settings for the method {name}; build the "
                                 "TrainConfig after registering it, or pass its settings.")
            active.append((method, config.settings[name]))
    return active


def default_settings():
    """{name: settings dataclass with its defaults} of every registered method."""
    return {name: method.settings_class() for name, method in registry().items()}


def settings_classes():
    """{name: settings dataclass} of every registered method (their fields are train's flags)."""
    return {name: method.settings_class for name, method in registry().items()}


def compare_variants():
    """{row name: Variant} of ``python -m car_tf.compare``: each base loss that is not a method
    (``--method=<loss>``), then each registered method's rows in registry order."""
    registered = registry()
    rows = {
        base: Variant((f"--method={base}", *BASE_LOSS_ROW_FLAGS.get(base, ())))
        for base in BASE_LOSSES
        if base not in registered
    }
    for method in registered.values():
        for name, variant in method.compare_variants(BASE_LOSSES).items():
            if name in rows:
                raise ValueError(f"the compare row {name!r} of the method {method.name} is already taken; "
                                 "rename it in its compare_variants.")
            rows[name] = variant
    return rows


def serializable_modules():
    """The modules whose import registers the Keras classes the registered methods' models hold."""
    return tuple(dict.fromkeys(m for method in registry().values() for m in method.serializable_modules))


# How the active methods' answers combine (the rules are in Method's docstring).


def one_head(config, active):
    """(head, scale) the active methods need, or None; two different answers are refused."""
    answers = [(method.name, needed) for method, _ in active if (needed := method.classifier_head(config))]
    if len({tuple(needed) for _, needed in answers}) > 1:
        (first, a), (second, b) = answers[0], next(x for x in answers if tuple(x[1]) != tuple(answers[0][1]))
        raise ValueError(f"{first} needs a {a[0]} head (scale {a[1]}) but {second} a {b[0]} head "
                         f"(scale {b[1]}), so they cannot train together; drop one of them.")
    return answers[0][1] if answers else None


def merged(active, hook, what, *args):
    """{key: value} of every active method's ``hook(settings, *args)``; a key two methods give is refused."""
    result, owner = {}, {}
    for method, settings in active:
        for key, value in getattr(method, hook)(settings, *args).items():
            if key in owner:
                raise ValueError(f"{owner[key]} and {method.name} both set the {what} {key!r}, so they "
                                 "cannot train together; drop one of them.")
            result[key], owner[key] = value, method.name
    return result


def at_most_one(active, hook, what, *args):
    """The one active method's answer to ``hook(settings, *args)`` that is not None, or None; two
    answers are refused."""
    answers = [(method.name, answer) for method, settings in active
               if (answer := getattr(method, hook)(settings, *args)) is not None]
    if len(answers) > 1:
        raise ValueError(f"only one of the run's methods may {what}, but {' and '.join(n for n, _ in answers)} "
                         "both do; drop one of them.")
    return answers[0][1] if answers else None
