"""Package exports that load their module on first use, so that importing a package imports
TensorFlow only if a name that needs it is used."""

import importlib


def lazy_exports(package, exports):
    """(``__getattr__``, ``__all__``) for ``package`` from {module: names}: a name loads its module."""
    module_of = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name):
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)

    return __getattr__, sorted(module_of)
