"""Recipes: pydantic models, YAML loading with ``extends:`` and dotted overrides."""

from .load import apply_overrides, dump_recipe, load_raw, load_recipe, validate
from .schema import Recipe

__all__ = ["Recipe", "apply_overrides", "dump_recipe", "load_raw", "load_recipe", "validate"]
