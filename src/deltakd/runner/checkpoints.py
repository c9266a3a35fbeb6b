"""Trainer checkpoints of a run: a manifest written into each, the best one verified when it is chosen
(and when a resumed run inherits it), the newest sound one (resume), and ``best`` + ``last`` at the end.

At the end the checkpoints stay real ``checkpoint-<step>`` folders (``transformers.trainer_utils.
get_last_checkpoint`` finds the final one); ``checkpoints/best`` and ``checkpoints/last`` are relative
symlinks to them (small pointer files where symlinks fail; read through ``RunDir.checkpoint``), so a
best that is also the last is stored once. ``train.keep_checkpoints`` says which folders stay.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import DeltakdError
from ..runs import RunDir
from ..utils import atomic_write_json, file_digest, honour_umask_tree, link_dir, warning

MANIFEST = "deltakd_manifest.json"
STATE = "trainer_state.json"
_STEP = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name.rsplit("-", 1)[-1])


def step_folders(folder: str | Path) -> list[Path]:
    """The real ``checkpoint-<step>`` folders of ``folder`` (not the best / last links), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP.match(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=checkpoint_step)


def write_manifest(ckpt: str | Path, digests: bool = True) -> None:
    """Record the size (and with ``digests`` the sha256) of every file of a saved checkpoint (written
    last, atomically); the files get the modes of the user's umask first (safetensors writes 0600)."""
    ckpt = Path(ckpt)
    honour_umask_tree(ckpt)
    files: dict[str, dict[str, Any]] = {p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size}
                                        for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST}
    if digests:
        for name, entry in files.items():
            entry["sha256"] = file_digest(ckpt / name)
    atomic_write_json(ckpt / MANIFEST, {"files": files})


def add_digests(ckpt: str | Path) -> bool:
    """Add the sha256 of every file to a sizes-only manifest (:func:`write_manifest` without digests);
    False, leaving the manifest as it was, when the checkpoint changed or went meanwhile (the Trainer
    rotated it away, say). Run after a save, off the training loop."""
    ckpt = Path(ckpt)
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        for name, entry in files.items():
            if "sha256" not in entry:
                digest = file_digest(ckpt / name)
                if (ckpt / name).stat().st_size != entry["size"]:
                    return False  # changed since the save: the size check names it
                entry["sha256"] = digest
        atomic_write_json(ckpt / MANIFEST, {"files": files}, parents=False)  # never remake a rotated-away folder
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """Why a checkpoint cannot be used (None: it is sound), naming the file.

    With a manifest every file listed must be there with its size (and its sha256, once recorded: the
    digests are added after the save, off the training loop, see :class:`ManifestCallback`); a checkpoint saved
    without one (an older deltakd, or a kill right after the Trainer finished it) counts when its
    ``trainer_state.json``, which the Trainer writes after the weights, optimizer and RNG states, parses.
    """
    ckpt = Path(ckpt)
    manifest = ckpt / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST} unreadable"
        for name, want in files.items():
            path = ckpt / name
            if not path.is_file():
                return f"{name} missing"
            if path.stat().st_size != want["size"]:
                return f"{name} has {path.stat().st_size} bytes, {want['size']} saved"
            if "sha256" in want and file_digest(path) != want["sha256"]:
                return f"{name} differs from the saved sha256"
    try:
        json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError):
        return f"{STATE} missing or cut"
    return None


def last_complete_checkpoint(folder: Path, warn: bool = True) -> str | None:
    """The newest sound checkpoint (see :func:`checkpoint_problem`); newer damaged ones are skipped,
    named in one warning line (``warn``) and left on disk: nothing resume may still need is deleted."""
    skipped = []
    found = None
    for ckpt in reversed(step_folders(folder)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            found = str(ckpt)
            break
        skipped.append(f"{ckpt.name} ({problem})")
    if skipped and warn:
        start = f"resuming from {Path(found).name}" if found else "no sound checkpoint, training from step 0"
        warning(__name__, f"--resume: {start}; skipped damaged {', '.join(skipped)} (left on disk)")
    return found


def check_resumable(run: RunDir, recipe: Any) -> None:
    """One line if ``run`` cannot be continued exactly: its checkpoints hold no optimizer state
    (``train.save_optimizer: false``), or it finished training (``checkpoints/last`` or ``model/``
    exist) but has no results.json, so resuming would train again from step 0 into the same folder."""
    if not recipe.train.save_optimizer:
        raise DeltakdError(f"--resume: '{recipe.name}' has train.save_optimizer: false, so its checkpoints hold the "
                           f"weights only (no optimizer, scheduler or RNG state) and training cannot continue "
                           f"exactly; train anew without --resume")
    done = [name for name, p in (("checkpoints/last", run.checkpoint("last")), ("model", run.model_dir))
            if p is not None and p.is_dir()]
    if done:
        raise DeltakdError(f"--resume: run '{run.path}' finished training ({' and '.join(done)} exist) but has no "
                           f"results.json; it is not retrained: evaluate its model with `deltakd eval {run.path}`, "
                           f"or train anew without --resume")


# --- the best checkpoint, verified when chosen ---------------------------------------------------

def _sound_best(args, state, damaged: Path) -> tuple[Path | None, float | None]:
    """The checkpoint to count as best instead of ``damaged``: the best-scoring sound one up to the
    current step (the newest among equals), else the newest sound one; (None, None) if none is sound."""
    metric = args.metric_for_best_model or ""
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    scores = {e["step"]: float(e[key]) for e in state.log_history if key in e and "step" in e}
    candidates = [c for c in step_folders(args.output_dir)
                  if c.name != damaged.name and checkpoint_step(c) <= state.global_step]
    sign = 1.0 if args.greater_is_better else -1.0

    def rank(c: Path) -> tuple[float, int]:
        score = scores.get(checkpoint_step(c), math.nan)
        return (sign * score if math.isfinite(score) else -math.inf, checkpoint_step(c))

    for ckpt in sorted(candidates, key=rank, reverse=True):
        if checkpoint_problem(ckpt) is None:
            score = scores.get(checkpoint_step(ckpt))
            return ckpt, score if score is not None and math.isfinite(score) else None
    return None, None


class ManifestCallback(TrainerCallback):
    """Writes the manifest of every checkpoint the Trainer saves (main process): the sizes at once (a
    stat per file), the sha256 digests in a background thread (hashing reads every byte; training goes
    on meanwhile; joined when training ends). Verifies the best checkpoint when it becomes best and when
    a resumed run inherits it: a damaged one (found by the Trainer only when it loads the best model at
    the end, a crash without model/ or results.json) is named in one warning line, left on disk, and
    replaced by the best sound one."""

    def __init__(self) -> None:
        self.verified: str | None = None
        self.hashing: list[threading.Thread] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self._verify_best(args, state)

    def on_save(self, args, state, control, **kwargs):
        ckpt = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(ckpt):
            write_manifest(ckpt, digests=False)
            thread = threading.Thread(target=add_digests, args=(ckpt,), name=f"deltakd-digests-{state.global_step}",
                                      daemon=True)
            thread.start()
            self.hashing.append(thread)
        self._verify_best(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        for thread in self.hashing:
            thread.join()
        self.hashing.clear()

    def _verify_best(self, args, state) -> None:
        best = state.best_model_checkpoint
        if best is None or best == self.verified or not args.load_best_model_at_end:
            return
        problem = checkpoint_problem(best)
        if problem is not None:
            damaged = Path(best)
            new, score = _sound_best(args, state, damaged)
            state.best_model_checkpoint = os.path.join(args.output_dir, new.name) if new is not None else None
            state.best_metric = score
            state.best_global_step = checkpoint_step(new) if new is not None else None
            if state.is_world_process_zero:
                instead = (f"the best is now {new.name}" if new is not None else
                           "no sound checkpoint to fall back on: the model at the end of training is kept")
                warning(__name__, f"best checkpoint {damaged.name} is damaged: {problem}; {instead} "
                                  f"({damaged.name} left on disk)")
        self.verified = state.best_model_checkpoint


# --- the end of a run ----------------------------------------------------------------------------

def keep_best_and_last(run: RunDir, best: str | None, keep: str | int = "best_last") -> dict[str, str]:
    """Point ``checkpoints/last`` at the final sound checkpoint and ``checkpoints/best`` at the best one
    (the last when none was recorded); with ``keep`` ``best_last`` delete every other checkpoint folder
    (``all`` / N: keep what the Trainer kept). Returns their steps."""
    ckpts = step_folders(run.checkpoints)
    if not ckpts:
        return {}
    last = Path(last_complete_checkpoint(run.checkpoints, warn=False) or ckpts[-1])  # not a damaged leftover
    chosen = run.checkpoints / Path(best).name if best else last
    if not chosen.is_dir():
        chosen = last
    link_dir(run.checkpoints / "last", last.name)
    link_dir(run.checkpoints / "best", chosen.name)
    if keep == "best_last":
        for extra in ckpts:
            if extra.name not in (last.name, chosen.name):
                shutil.rmtree(extra)
    return {"best_step": str(checkpoint_step(chosen)), "last_step": str(checkpoint_step(last))}
