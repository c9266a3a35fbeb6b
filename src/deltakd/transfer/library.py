"""The module library: one delta module per source task, trained as ordinary classification runs (a sweep), kept on disk.

Each source module is the best cell of a learning-rate x batch-size grid (chosen on the source's
validation main metric) run as a ``deltakd sweep`` (resumable: finished cells are skipped; validation
every ``train.eval_every`` steps, early stopping after ``train.early_stop`` evaluations without
improvement, best checkpoint kept). The chosen module is stored as::

    <library.dir>/<backbone>/<method>-<digest>/<task>/
      module.safetensors   delta parameters + the source's own head (split apart at fusion)
      meta.json            task, method, backbone, peft config, labels, metrics, grid, chosen run

``digest`` covers everything that shapes the module except the grid; a finished module whose grid is
the current one is reused without touching the sweep.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import DeltakdError
from ..models.bottleneck import adapter_state_dict, bottleneck_modules
from ..models.delta import find_model_dir, load_trained, read_meta
from ..recipe import Recipe, validate
from ..runs import RunResults
from ..sweep import run_sweep
from ..utils import atomic_save_tensors, atomic_write_json, text_digest
from .recipe import TransferRecipe
from .state_dicts import TransferError, lora_scaling, split_head

MODULE_FILE = "module.safetensors"
META_FILE = "meta.json"


# --------------------------------------------------------------------------------------------
# delta state dicts of live models
# --------------------------------------------------------------------------------------------


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def delta_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's delta module (and trainable head) as a detached CPU state dict.

    peft models: ``peft.get_peft_model_state_dict`` (LoRA factors, prefix embeddings, head);
    bottleneck adapters: :func:`deltakd.models.bottleneck.adapter_state_dict`.
    """
    if _is_peft(model):
        state = get_peft_model_state_dict(model)
    else:
        if not bottleneck_modules(model):
            raise TransferError(f"{type(model).__name__} carries no delta module (peft or bottleneck)")
        state = adapter_state_dict(model)
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def load_delta(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a (possibly head-less) delta state dict into ``model`` and check every value arrived."""
    if _is_peft(model):
        current = delta_state(model)  # peft wants every saved key (the head too): keep the model's own
        unknown = sorted(set(state) - set(current))
        if unknown:
            raise TransferError(f"fused module keys the model does not have: {unknown[:3]}")
        result = set_peft_model_state_dict(model, {**current, **state})
        # prompt learning: peft loads prompt_embeddings into the prompt encoder itself, then passes
        # the same dict to load_state_dict, which lists it as unexpected; the check below verifies it
        unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if k != "prompt_embeddings"]
    else:
        result = model.load_state_dict(state, strict=False)
        unexpected = list(result.unexpected_keys)
    if unexpected:
        raise TransferError(f"fused module keys the model does not have: {unexpected[:3]}")
    now = delta_state(model)
    for k, v in state.items():
        if k not in now or now[k].shape != v.shape or not torch.equal(now[k], v.to(now[k].dtype)):
            raise TransferError(f"loading the fused module did not set '{k}'")


# --------------------------------------------------------------------------------------------
# the library
# --------------------------------------------------------------------------------------------


@dataclass
class SourceModule:
    task: str
    path: Path
    meta: dict[str, Any]
    state: dict[str, Tensor]

    @property
    def labels(self) -> list[str] | None:
        return self.meta.get("labels")

    @property
    def scaling(self) -> float:
        peft = self.meta["peft"]
        return lora_scaling(peft["r"], peft["alpha"]) if peft["method"] == "lora" else 1.0


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "x"


def backbone_slug(backbone: str) -> str:
    """A folder name for the backbone: the name itself, or a path's last part + a short digest."""
    if "/" in backbone or "\\" in backbone:
        return f"{slug(Path(backbone).name)}-{text_digest(backbone)[:8]}"
    return slug(backbone)


def _task_dict(recipe: TransferRecipe, task: str, **extra: Any) -> dict[str, Any]:
    t = recipe.transfer.tasks[task].model_dump(mode="json", exclude_none=True)
    if recipe.transfer.max_length is not None:
        t["max_length"] = recipe.transfer.max_length
    t.setdefault("split_seed", 0)  # one train/valid split across seeds and grid cells
    t.update({k: v for k, v in extra.items() if v is not None})
    return t


def module_dir(recipe: TransferRecipe, task: str) -> Path:
    spec = recipe.transfer
    lib = spec.library
    backbone = [spec.backbone] + ([spec.backbone_revision] if spec.backbone_revision else [])
    key = text_digest("transfer-source-v1", *backbone, spec.peft.model_dump(mode="json"),
                      lib.train.model_dump(mode="json"), lib.max_train_samples, lib.max_eval_samples,
                      _task_dict(recipe, task))[:10]
    return lib.dir / backbone_slug(spec.backbone) / f"{spec.peft.method}-{key}" / task


def source_recipe(recipe: TransferRecipe, task: str) -> Recipe:
    """The ordinary recipe of one source task, with the library's grid as its ``sweep:``."""
    spec, lib = recipe.transfer, recipe.transfer.library
    folder = module_dir(recipe, task)
    data = {
        "name": f"{task}-{spec.peft.method}",
        "description": f"transfer source module: {spec.peft.method} on {task}",
        "task": _task_dict(recipe, task, max_train_samples=lib.max_train_samples,
                           max_eval_samples=lib.max_eval_samples),
        "model": {"name": spec.backbone, "revision": spec.backbone_revision},
        "peft": spec.peft.model_dump(mode="json"),
        "train": lib.train.model_dump(mode="json"),
        "track": [],
        "output_dir": str(folder.parent / "runs"),
        "sweep": {"train.lr": list(lib.grid.lr), "train.batch_size": list(lib.grid.batch_size)},
    }
    return validate(data, source=f"{recipe.name}: source '{task}'")


def _grid(recipe: TransferRecipe) -> dict[str, list[Any]]:
    g = recipe.transfer.library.grid
    return {"lr": [float(x) for x in g.lr], "batch_size": [int(x) for x in g.batch_size]}


def read_module(folder: Path) -> SourceModule:
    meta_path = folder / META_FILE
    if not meta_path.is_file() or not (folder / MODULE_FILE).is_file():
        raise DeltakdError(f"'{folder}' holds no finished source module ({META_FILE} + {MODULE_FILE})")
    meta = json.loads(meta_path.read_text())
    return SourceModule(meta["task"], folder, meta, load_file(str(folder / MODULE_FILE)))


def finished_module(recipe: TransferRecipe, task: str) -> SourceModule | None:
    """The stored module of ``task`` if it finished with the current grid."""
    folder = module_dir(recipe, task)
    try:
        mod = read_module(folder)
    except (DeltakdError, OSError, ValueError, KeyError):
        return None
    return mod if mod.meta.get("grid") == _grid(recipe) else None


def build_module(recipe: TransferRecipe, task: str, progress: bool = True) -> SourceModule:
    """Train (or reuse) the grid of ``task`` and store its best cell's module."""


    found = finished_module(recipe, task)
    if found is not None:
        return found
    result = run_sweep(source_recipe(recipe, task), progress=progress)
    best = result.summary.best()
    if not best:
        raise DeltakdError(f"source '{task}': no grid cell finished with a validation metric")
    chosen = next(o for o in result.trials if o.name in best[0].trials and o.run_dir is not None)
    run_results = RunResults.read(chosen.run_dir)
    model, _ = load_trained(find_model_dir(chosen.run_dir))
    state = {k: v.contiguous() for k, v in delta_state(model).items()}
    spec = recipe.transfer
    meta = {
        "task": task,
        "method": spec.peft.method,
        "backbone": spec.backbone,
        "peft": spec.peft.model_dump(mode="json"),
        "labels": run_results.get("labels") or _labels_of(chosen.run_dir),
        "main_metric": run_results.get("main_metric"),
        "metrics": run_results.get("metrics", {}),
        "setting": chosen.setting,
        "grid": _grid(recipe),
        "grid_results": [{"setting": s.setting, "mean": s.mean, "best": s.best} for s in result.summary.settings],
        "run_dir": str(chosen.run_dir),
        "train_steps": run_results.get("train_steps"),
    }
    folder = module_dir(recipe, task)
    atomic_save_tensors(folder / MODULE_FILE, state)
    atomic_write_json(folder / META_FILE, meta)  # written last: a module is finished when meta.json exists
    return read_module(folder)


def _labels_of(run_dir: str | Path) -> list[str] | None:
    return read_meta(find_model_dir(run_dir)).get("labels")


def given_module(path: str | Path, what: str = "transfer.target.init_from") -> dict[str, Tensor]:
    """The delta module stored at ``path``, its head dropped (the target's head starts fresh): a
    library module folder (``module.safetensors`` + ``meta.json``), a ``.safetensors`` file of delta
    parameters (e.g. a ``fused/`` start), or a finished run / its ``model/`` folder / a recipe's run
    folder (its newest finished run). Bad input: one-line :class:`DeltakdError` naming ``what``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DeltakdError(f"{what}: '{p}' does not exist")
    try:
        if p.is_file():
            if p.suffix != ".safetensors":
                raise DeltakdError(f"{what}: '{p}' is not a .safetensors file, a module folder or a run")
            state = load_file(str(p))
        elif (p / MODULE_FILE).is_file():
            state = load_file(str(p / MODULE_FILE))
        else:
            model, _ = load_trained(find_model_dir(p, what))
            state = delta_state(model)
    except DeltakdError as err:
        msg = str(err)
        raise DeltakdError(msg if msg.startswith(what) else f"{what}: {msg}") from None
    except Exception as err:  # a corrupt file, a folder transformers cannot read
        raise DeltakdError(f"{what}: cannot read a module from '{p}': "
                           f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    delta = {k: v.contiguous() for k, v in split_head(state)[0].items()}
    if not delta:
        raise DeltakdError(f"{what}: '{p}' holds no delta module parameters")
    return delta
