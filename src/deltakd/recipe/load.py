"""Read a recipe: YAML (safe_load), ``extends:`` chains, dotted CLI overrides, one-line errors."""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import DeltakdError
from .schema import PeftConfig, Recipe


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DeltakdError(f"recipe file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise DeltakdError(f"recipe file '{path}' cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DeltakdError(f"{path}: not a YAML recipe: byte 0x{e.object[e.start]:02x} at offset {e.start} "
                           "is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DeltakdError(f"{path}{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DeltakdError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Child keys win; nested mappings merge; lists and scalars are replaced.

    A mapping whose ``method`` differs from the base's (``peft: {method: full}`` over a LoRA
    section) replaces it whole: the other method's options do not apply to it.
    """
    out = copy.deepcopy(base)
    for k, v in child.items():
        switched = isinstance(v, dict) and isinstance(out.get(k), dict) and "method" in v \
            and v["method"] != out[k].get("method")
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not switched:
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _resolve_extends(ref: str, recipe_path: Path) -> Path:
    cand = Path(ref)
    if cand.is_absolute():
        return cand
    beside = recipe_path.parent / cand
    return beside if beside.is_file() else cand


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe as a plain dict with every ``extends:`` merged in (base first)."""
    path = Path(path)
    real = path.resolve()
    if real in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, real))
        raise DeltakdError(f"extends: cycle in recipes: {chain}")
    data = _read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise DeltakdError(f"{path}: extends: expected a path or a list of paths, got {parents!r}")
    merged: dict[str, Any] = {}
    for ref in parents:
        parent = _resolve_extends(ref, path)
        if not parent.is_file():
            raise DeltakdError(f"{path}: extends: recipe file '{ref}' does not exist")
        merged = deep_merge(merged, load_raw(parent, (*_seen, real)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-5`` -> (['train', 'lr'], 3e-05); the value is read as YAML."""
    if "=" not in text:
        raise DeltakdError(f"override '{text}': expected KEY=VALUE, e.g. train.lr=3e-5")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise DeltakdError(f"override '{text}': bad key '{key}'")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    # YAML 1.1 reads 3e-5 as a string; numbers are what people mean here.
    if isinstance(parsed, str):
        try:
            parsed = float(parsed) if any(c in parsed for c in ".eE") else int(parsed)
        except ValueError:
            pass
    return parts, parsed


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise DeltakdError(f"override '{text}': '{p}' is not a section")
            node = child
        node[parts[-1]] = value
    return out


def split_sweep_overrides(overrides: Iterable[str]) -> tuple[list[str], dict[str, list[Any]]]:
    """``sweep.train.lr=[1e-5,2e-5]`` on the command line sets one grid key; the rest are ordinary overrides."""
    plain, grid = [], {}
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key.startswith("sweep.") and "=" in text:
            _, value = parse_override(text)
            grid[key.removeprefix("sweep.")] = value if isinstance(value, list) else [value]
        else:
            plain.append(text)
    return plain, grid


def _models_in(ann: Any) -> list[type[BaseModel]]:
    """Every pydantic model named by an annotation (through Optional, list, Union, Annotated)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for arg in typing.get_args(ann) for m in _models_in(arg)]


def _section_model(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of ``loc``, following union tags ('lora')."""
    current: type[BaseModel] = root
    candidates: list[type[BaseModel]] = []
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        tagged = [m for m in candidates if "method" in m.model_fields
                  and part in typing.get_args(m.model_fields["method"].annotation)]
        if tagged:
            current, candidates = tagged[0], []
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        candidates = _models_in(field.annotation)
        if not candidates:
            return None
        current = candidates[0]
    return current


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel] = Recipe) -> str:
    """The first problem as one line: where, the value, and what is allowed."""
    e = err.errors(include_url=False)[0]
    loc = tuple(e.get("loc", ()))
    # drop the union tag from the printed key ('peft.lora.r' -> 'peft.r')
    shown = [str(p) for i, p in enumerate(loc) if not (i and loc[i - 1] == "peft" and p in _PEFT_TAGS)]
    key = ".".join(shown) or "<recipe>"
    typ = e.get("type", "")
    value = e.get("input")
    more = f" (and {len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    if typ == "extra_forbidden":
        section = _section_model(root, loc)
        allowed = sorted(section.model_fields) if section is not None else []
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"{source}: unknown key '{key}'{hint}{more}"
    if typ == "missing":
        return f"{source}: missing required key '{key}'{more}"
    if typ == "union_tag_invalid" or typ == "union_tag_not_found":
        ctx = e.get("ctx", {})
        return (f"{source}: {key}.method: {ctx.get('tag', value)!r} is not a known method; "
                f"allowed: {ctx.get('expected_tags', '')}{more}")
    msg = e.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    if typ == "value_error" and (not shown or msg.startswith(shown[0])):
        return f"{source}: {msg}{more}"  # validators of whole sections name their keys
    shown_value = value if not isinstance(value, (dict, list)) or len(str(value)) < 80 else "..."
    return f"{source}: {key}: {shown_value!r} is not allowed: {msg}{more}"


_PEFT_TAGS = {tag for m in _models_in(PeftConfig) for tag in typing.get_args(m.model_fields["method"].annotation)}


def validate(data: dict[str, Any], source: str = "recipe", check_files: bool = True) -> Recipe:
    try:
        return Recipe.model_validate(data, context={"check_files": check_files})
    except ValidationError as err:
        raise DeltakdError(format_validation_error(err, source)) from None


def load_recipe(path: str | Path, overrides: Iterable[str] = (), check_files: bool = True) -> Recipe:
    """Load, merge ``extends:``, apply overrides, validate. Raises DeltakdError with one line."""
    data = apply_overrides(load_raw(path), overrides)
    return validate(data, source=str(path), check_files=check_files)


def dump_recipe(recipe: Recipe) -> dict[str, Any]:
    """A plain YAML-ready dict of a resolved recipe."""
    return recipe.model_dump(mode="json")
