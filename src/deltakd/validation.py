"""A recipe file checked before the heavy imports: its kind, its schema, the files it names.

Everything here imports without torch, transformers or datasets (the recipe models and the loss
and estimator name tables are plain pydantic and Python), so ``deltakd train|sweep|pipeline|transfer``
refuse a bad recipe in a fraction of a second and ``--dry-run`` prints the resolved recipe without
loading a model library. The api validates again, through the family table
(:data:`deltakd.families.FAMILIES`), with the same validators: :data:`VALIDATORS` names, per recipe
kind, the function each family's ``validate`` calls (``tests/test_validation.py`` checks both agree).
What only the data or the models show (labels, tokenizers, model paths, teachers) is checked later,
by each family's ``prepare``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from .errors import DeltakdError
from .multistage.recipe import validate as validate_multistage
from .recipe import apply_overrides, dump_recipe, load_raw, validate
from .recipe.kinds import TRANSFER, recipe_kind
from .recipe.load import split_sweep_overrides
from .transfer.recipe import validate_transfer

#: recipe kind -> validator (data, source, check_files) -> recipe model; the run kinds in the order of FAMILIES
VALIDATORS: dict[str, Callable[..., Any]] = {
    "classification": validate,
    "lm": validate,
    "dialogue": validate,
    "multistage": validate_multistage,
    TRANSFER: validate_transfer,
}
RUN_KINDS = tuple(k for k in VALIDATORS if k != TRANSFER)


def run_kind(data: dict[str, Any]) -> str:
    """The kind of a run recipe (one family's); the lines of :func:`deltakd.families.family` otherwise."""
    kind = recipe_kind(data)
    if kind == TRANSFER:
        raise DeltakdError("this is a transfer recipe (many runs); run it with `deltakd transfer`")
    if kind not in RUN_KINDS:
        raise DeltakdError(f"family: '{kind}' is not one of {', '.join(RUN_KINDS)}")
    return kind


def check_run(path: str | Path, overrides: Iterable[str] = ()) -> Any:
    """A ``deltakd train`` recipe: ``extends:`` merged, overrides applied, validated by its family's model."""
    data = apply_overrides(load_raw(path), overrides)
    return VALIDATORS[run_kind(data)](data, source=str(path), check_files=True)


def check_sweep(path: str | Path, overrides: Iterable[str] = ()) -> Any:
    """A ``deltakd sweep`` recipe, its grid given ``sweep.KEY=[...]`` overrides (as :func:`deltakd.sweep.plan_sweep`)."""
    plain, grid = split_sweep_overrides(overrides)
    data = apply_overrides(load_raw(path), plain)
    if grid:
        data["sweep"] = {**(data.get("sweep") or {}), **grid}
    return VALIDATORS[run_kind(data)](data, source=str(path), check_files=True)


def check_pipeline(paths: Iterable[str | Path], overrides: Iterable[str] = (), init_from: str | None = None,
                   output_dir: str | Path | None = None) -> list[Any]:
    """``deltakd pipeline`` stage recipes, with the overrides :func:`deltakd.pipeline.run_pipeline` gives them."""
    common = list(overrides) + ([f"output_dir={output_dir}"] if output_dir is not None else [])
    out = []
    for i, path in enumerate(paths):
        extra = [f"init_from={init_from}"] if i == 0 and init_from else []
        data = apply_overrides(load_raw(path), [*common, *extra])
        if recipe_kind(data) != "multistage":
            raise DeltakdError(f"{path}: not a multistage recipe (needs 'family: multistage')")
        out.append(validate_multistage(data, source=str(path), check_files=True))
    return out


def check_transfer(path: str | Path, overrides: Iterable[str] = ()) -> Any:
    """A ``deltakd transfer`` recipe (top-level ``transfer:`` section)."""
    data = apply_overrides(load_raw(path), overrides)
    if recipe_kind(data) != TRANSFER:
        raise DeltakdError(f"{path}: not a transfer recipe (no top-level 'transfer:' section)")
    return validate_transfer(data, source=str(path), check_files=True)


def resolved_yaml(recipes: Any | list[Any]) -> str:
    """The fully resolved recipe(s) as YAML (one document per recipe), as a run's ``recipe.yaml`` holds it."""
    docs = recipes if isinstance(recipes, list) else [recipes]
    return yaml.safe_dump_all([dump_recipe(r) for r in docs], sort_keys=False, allow_unicode=True)
