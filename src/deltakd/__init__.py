"""deltakd: parameter-efficient fine-tuning, knowledge distillation and delta-module transfer.

The Python API (:mod:`deltakd.api`) is reachable from the package, imported on first use so that
``import deltakd`` stays light (no torch)::

    from deltakd import train, predict
    results = train("recipes/quickstart.yaml", ["train.epochs=1"])
    print(predict(results["run_dir"], ["a wonderful film", "a dull plot"]))

``evaluate``, ``sweep`` and ``report`` are also the names of subpackages / modules: as attributes
of the package they are always the API functions (a class-level lookup, so importing those
modules does not replace them); reach the modules with ``from deltakd.sweep import ...``.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"

# what `from deltakd import X` gives: functions of deltakd.api, imported on first access
_API = ("train", "evaluate", "predict", "load_trained", "sweep", "report", "push", "generate", "dialogue_eval",
        "list_recipes", "load_recipe", "resolve_recipe")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """PEP 562: the API functions, imported with :mod:`deltakd.api` on first access."""
    if name in _API:
        from . import api  # lazy: see the module docstring

        return getattr(api, name)
    raise AttributeError(f"module 'deltakd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


class _ApiName:
    """A package attribute that is the API function of its name, whatever the import system sets:
    importing the submodule ``deltakd.sweep`` sets the attribute ``sweep`` of the package, which
    this data descriptor shadows (the module stays in ``sys.modules``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, module: Any, owner: type | None = None) -> Any:
        return __getattr__(self.name)

    def __set__(self, module: Any, value: Any) -> None:
        if not isinstance(value, types.ModuleType):  # the import system's assignment of the submodule is moot
            raise AttributeError(f"deltakd.{self.name} is the API function; it cannot be replaced")


class _Package(types.ModuleType):
    evaluate = _ApiName()
    sweep = _ApiName()
    report = _ApiName()


sys.modules[__name__].__class__ = _Package
