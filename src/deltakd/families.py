"""The family table: every kind of run deltakd trains, in one visible place.

Adding a family is one folder (its :class:`deltakd.runner.Family` subclass and what it needs)
plus one line here. :func:`deltakd.recipe.kinds.recipe_kind` tells which entry a recipe belongs
to; the run lifecycle (:mod:`deltakd.runner`) then drives that family's hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .causal_lm import CausalLMFamily
from .classify import ClassificationFamily
from .dialogue.family import DialogueFamily
from .errors import DeltakdError
from .multistage.family import MultistageFamily
from .recipe import apply_overrides, load_raw
from .recipe.kinds import TRANSFER, recipe_kind
from .runner import Family, Prepared
from .runs import RunDir, read_recipe_data

FAMILIES: dict[str, Family] = {
    "classification": ClassificationFamily(),  # sequence classification / regression, logit and layer KD
    "lm": CausalLMFamily(),                     # causal LMs from scratch or distilled (partial_kd)
    "dialogue": DialogueFamily(),               # act-controlled DailyDialog responses
    "multistage": MultistageFamily(),           # multilingual sentence-embedding distillation stages
}


def family(kind: str) -> Family:
    """The family of a recipe kind; one line naming the valid kinds otherwise."""
    if kind == TRANSFER:
        raise DeltakdError("this is a transfer recipe (many runs); run it with `deltakd transfer`")
    try:
        return FAMILIES[kind]
    except KeyError:
        raise DeltakdError(f"family: '{kind}' is not one of {', '.join(FAMILIES)}") from None


def family_of(recipe: Any) -> Family:
    """The family of a validated recipe (a pydantic recipe model) or a raw recipe dict."""
    raw = recipe if isinstance(recipe, dict) else recipe.model_dump(mode="json")
    return family(recipe_kind(raw))


def load(path: str | Path, overrides: Iterable[str] = (), check_files: bool = True) -> tuple[Any, Family]:
    """A recipe file validated by its family (after ``extends:`` and overrides), and that family."""
    fam = family(recipe_kind(apply_overrides(load_raw(path), overrides)))
    return fam.load_recipe(path, overrides, check_files=check_files), fam


def run_family(run: RunDir) -> Family:
    """The family that made a run directory (from its ``recipe.yaml``)."""
    data = read_recipe_data(run)
    if data is None:
        raise DeltakdError(f"'{run.path}' is not a deltakd run directory (no readable recipe.yaml)")
    return family(recipe_kind(data))


def prepare(recipe: Any) -> Prepared:
    """The recipe prepared by its family (data, model, teacher): for tools that drive a Trainer themselves."""
    return family_of(recipe).prepare(recipe)
