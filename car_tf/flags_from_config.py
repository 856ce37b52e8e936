"""absl flags made from configuration dataclasses, so that a setting is written once: as a field.

A field ``name: T = setting(default, help=..., ...)`` (car_tf.method.setting, or
``dataclasses.field(default=..., metadata={"help": ...})``) becomes the flag ``--name`` with that
default and help text:

    bool                  a bool flag: --name / --noname
    int, float, str       an integer / float / string flag; metadata "lower_bound", "upper_bound"
    Literal["a", "b"]     an enum flag over those values
    str, "choices"        an enum flag over metadata "choices": a sequence, or the name of a
                          registry in CHOICES (its values are read when the flag is defined)
    tuple[...]            a list flag (comma-separated); the dataclass receives the strings as a
                          tuple and converts them itself (OptimizerConfig.lr_decay_epochs); with
                          metadata "repeated": a flag given once per value (its values may hold commas)
    T | None              the same flag, unset (None) by default
    a dataclass           no flag of its own: a nested section, whose fields are flags in turn

Metadata "flag" names the flag when it is not the field's name (FlowTrainingConfig.epochs is
--flow_epochs). A field without a default gets a flag unset by default, which
``section_from_flags`` refuses unset.
The command-line modules alone import this module; the library takes the dataclasses themselves.
"""

import dataclasses
import sys
import types
import typing

from absl import flags


def _datasets():
    from car_tf.data.sources import DATASETS

    return list(DATASETS)


def _data_recipes():
    from car_tf.data.recipes import RECIPES

    return ["auto", *RECIPES]


def _lt_profiles():
    from car_tf.data.longtail import PROFILES

    return list(PROFILES)


def _samplers():
    from car_tf.data.sampling import SAMPLERS

    return list(SAMPLERS)


def _strategies():
    from car_tf.distribute import STRATEGIES

    return list(STRATEGIES)


def _schedules():
    from car_tf.training.schedules import SCHEDULES

    return list(SCHEDULES)


def _base_losses():
    from car_tf.losses.registry import BASE_LOSSES

    return list(BASE_LOSSES)


def _methods():
    from car_tf.training.methods import method_names

    return list(method_names())


# Registries a field's metadata "choices" may name: name -> () -> the accepted values, in order.
CHOICES = {
    "datasets": _datasets,
    "data_recipes": _data_recipes,
    "lt_profiles": _lt_profiles,
    "samplers": _samplers,
    "strategies": _strategies,
    "schedules": _schedules,
    "base_losses": _base_losses,
    "methods": _methods,
}
_FIELD_MARK = "car_tf_field"  # attribute of a flag made here: "module.Class.field" it was made from


def fields_of(cls):
    """[(dataclasses.Field, resolved annotation)] of the configuration dataclass ``cls``."""
    if not is_section(cls):
        raise TypeError(f"{cls!r} is not a dataclass; flags are made from configuration dataclasses.")
    hints = typing.get_type_hints(cls)
    return [(field, hints[field.name]) for field in dataclasses.fields(cls) if field.init]


def is_section(annotation):
    """Whether ``annotation`` is a configuration dataclass (a field of that type is a nested section)."""
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def flag_name(field):
    """The flag a field makes: metadata "flag", else the field's name."""
    return field.metadata.get("flag", field.name)


def leaves(cls):
    """[(owning dataclass, field, annotation)] of the fields of ``cls`` that are flags, nested
    sections' fields included, in order."""
    found = []
    for field, annotation in fields_of(cls):
        if is_section(annotation):
            found += leaves(annotation)
        else:
            found.append((cls, field, annotation))
    return found


def _origin(cls, field, annotation):
    """(kind, optional, values): kind is bool, int, float, str, "enum", "list" or "repeated"."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            raise TypeError(f"{cls.__name__}.{field.name}: {annotation} has no flag; use T or T | None.")
        optional, annotation = True, rest[0]
    if typing.get_origin(annotation) is typing.Literal:
        return "enum", optional, list(typing.get_args(annotation))
    if annotation is tuple or typing.get_origin(annotation) is tuple:
        return ("repeated" if field.metadata.get("repeated") else "list"), optional, None
    choices = field.metadata.get("choices")
    if choices is not None:
        if isinstance(choices, str):
            if choices not in CHOICES:
                raise TypeError(f"{cls.__name__}.{field.name}: choices={choices!r} names no registry; use one "
                                f"of {', '.join(CHOICES)} or a sequence of values.")
            return "enum", optional, list(CHOICES[choices]())
        return "enum", optional, list(choices)
    if annotation in (bool, int, float, str):
        return annotation, optional, None
    raise TypeError(f"{cls.__name__}.{field.name}: {annotation} has no flag; use bool, int, float, str, "
                    "a Literal, a tuple, or one of them | None.")


def _default(cls, field):
    if field.default_factory is not dataclasses.MISSING:
        raise TypeError(f"{cls.__name__}.{field.name}: a default_factory has no flag default; give a default.")
    default = None if field.default is dataclasses.MISSING else field.default
    if isinstance(default, (tuple, list)):
        return [str(v) for v in default]
    return default


def _mark(cls, field):
    return f"{cls.__module__}.{cls.__qualname__}.{field.name}"


def calling_module(skip=()):
    """The module name absl files a flag under: the first caller outside this module and ``skip``
    (sys.argv[0] for the program's main module, as absl itself does)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in (__name__, *skip):
        frame = frame.f_back
    name = frame.f_globals.get("__name__") if frame is not None else None
    return sys.argv[0] if name in (None, "__main__") else name


def check_distinct(classes):
    """Refuses two fields of the same flag name among ``classes``: they would be one flag."""
    owner = {}
    for top in classes:
        for cls, field, _ in leaves(top):
            name = flag_name(field)
            if name in owner and owner[name] != (cls, field.name):
                raise ValueError(f"--{name} would be a flag of both {owner[name][0].__name__} and "
                                 f"{cls.__name__}; rename one of the two fields.")
            owner[name] = (cls, field.name)


def define_flags(*classes, flag_values=flags.FLAGS, only=None, module_name=None):
    """Defines a flag for each field of the dataclasses ``classes`` (``only``: of the fields named);
    returns their names. A flag already made from the same field is kept, so defining twice is a
    no-op; a flag of the same name from elsewhere is refused. ``module_name``: the module absl files
    the flags under (default: the calling module, for its ``--help``)."""
    check_distinct(classes)
    module_name = module_name or calling_module()
    names = []
    for top in classes:
        for cls, field, annotation in leaves(top):
            if only is not None and flag_name(field) not in only:
                continue
            names.append(flag_name(field))
            _define(cls, field, annotation, flag_values, module_name)
    return names


def _define(cls, field, annotation, flag_values, module_name):
    name, mark = flag_name(field), _mark(cls, field)
    if name in flag_values:
        if getattr(flag_values[name], _FIELD_MARK, None) == mark:
            return
        raise ValueError(f"--{name} is already a flag of {flag_values.find_module_defining_flag(name)}, so the "
                         f"field {cls.__name__}.{name} cannot have its own; rename the field.")
    help_text = field.metadata.get("help")
    if not help_text:
        raise TypeError(f"{cls.__name__}.{name} has no help text; write it with setting(..., help=...).")
    kind, _, values = _origin(cls, field, annotation)
    default = _default(cls, field)
    common = dict(flag_values=flag_values, module_name=module_name)
    bounds = {k: field.metadata[k] for k in ("lower_bound", "upper_bound") if k in field.metadata}
    if kind is bool:
        holder = flags.DEFINE_bool(name, default, help_text, **common)
    elif kind is int:
        holder = flags.DEFINE_integer(name, default, help_text, **bounds, **common)
    elif kind is float:
        holder = flags.DEFINE_float(name, default, help_text, **bounds, **common)
    elif kind is str:
        holder = flags.DEFINE_string(name, default, help_text, **common)
    elif kind == "enum":
        holder = flags.DEFINE_enum(name, default, values, help_text, **common)
    elif kind == "repeated":
        holder = flags.DEFINE_multi_string(name, default, help_text, **common)
    else:
        holder = flags.DEFINE_list(name, default, help_text, **common)
    setattr(flag_values[holder.name], _FIELD_MARK, mark)


def section_from_flags(cls, flag_values, only=None):
    """``cls`` built from the flags made from its fields, nested sections included (``only``: from
    the flags named; the other fields keep their defaults). A field without its flag is an error,
    never a silent default."""
    values = {}
    for field, annotation in fields_of(cls):
        name = flag_name(field)
        if is_section(annotation):
            values[field.name] = section_from_flags(annotation, flag_values, only)
            continue
        if only is not None and name not in only:
            continue
        if name not in flag_values or getattr(flag_values[name], _FIELD_MARK, None) != _mark(cls, field):
            raise ValueError(f"--{name} is not a flag made from {cls.__name__}.{field.name}; define this "
                             f"command's flags with car_tf.flags_from_config.define_flags({cls.__name__}).")
        value = flag_values[name].value
        if value is None and field.default is dataclasses.MISSING:
            raise ValueError(f"--{name} is required ({field.metadata['help'].rstrip('.')}); give it.")
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def flag_names(*classes):
    """The names of the flags the dataclasses ``classes`` make, nested sections' included."""
    return [flag_name(field) for top in classes for _, field, _ in leaves(top)]
