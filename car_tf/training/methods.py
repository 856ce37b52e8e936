"""Training methods by name: what each one adds to the trainer.

A method is a folder of car_tf (``car/``, ``concutmix/``, ``decoupled/``) whose ``method.py``
defines a ``Method`` subclass (car_tf.training.method): its settings dataclass and its hooks. The
trainer calls the hooks of the run's active methods in registry order and knows no method by
name. Adding a method means adding its folder and one line to ``registry()``.
"""

from car_tf.losses.registry import BASE_LOSSES


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
