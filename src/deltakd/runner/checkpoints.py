"""Trainer checkpoints of a run: a manifest written into each, the newest sound one (resume), and
``best/`` + ``last/`` at the end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import DeltakdError
from ..runs import RunDir
from ..utils import atomic_write_json, file_digest, warning

MANIFEST = "deltakd_manifest.json"
STATE = "trainer_state.json"


def checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name.rsplit("-", 1)[-1])


def write_manifest(ckpt: str | Path) -> None:
    """Record the size and sha256 of every file of a saved checkpoint (written last, atomically)."""
    ckpt = Path(ckpt)
    files = {p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST}
    atomic_write_json(ckpt / MANIFEST, {"files": files})


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None: it is sound).

    With a manifest every file listed must be there with its size and sha256; a checkpoint saved
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
            if file_digest(path) != want["sha256"]:
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
    for ckpt in sorted(Path(folder).glob(f"{PREFIX_CHECKPOINT_DIR}-*"), key=checkpoint_step, reverse=True):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            found = str(ckpt)
            break
        skipped.append(f"{ckpt.name} ({problem})")
    if skipped and warn:
        start = f"resuming from {Path(found).name}" if found else "no sound checkpoint, training from step 0"
        warning(__name__, f"--resume: {start}; skipped damaged {', '.join(skipped)} (left on disk)")
    return found


def check_not_trained(run: RunDir) -> None:
    """One line if ``run`` finished training (``checkpoints/last`` or ``model/`` exist) but has no
    results.json: resuming it would train again from step 0 into the same folder."""
    done = [p.relative_to(run.path).as_posix() for p in (run.checkpoints / "last", run.model_dir) if p.is_dir()]
    if done:
        raise DeltakdError(f"--resume: run '{run.path}' finished training ({' and '.join(done)} exist) but has no "
                           f"results.json; it is not retrained: evaluate its model with `deltakd eval {run.path}`, "
                           f"or train anew without --resume")


class ManifestCallback(TrainerCallback):
    """Writes the manifest of every checkpoint the Trainer saves (main process)."""

    def on_save(self, args, state, control, **kwargs):
        ckpt = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(ckpt):
            write_manifest(ckpt)


def keep_best_and_last(run: RunDir, best: str | None) -> dict[str, str]:
    """Name the final Trainer checkpoint ``last`` and the best one ``best``; returns their steps."""
    ckpts = sorted(run.checkpoints.glob("checkpoint-*"), key=checkpoint_step)
    out: dict[str, str] = {}
    if not ckpts:
        return out
    last = Path(last_complete_checkpoint(run.checkpoints, warn=False) or ckpts[-1])  # not a damaged leftover
    for name in ("best", "last"):
        shutil.rmtree(run.checkpoints / name, ignore_errors=True)
    if best and Path(best).exists() and Path(best) != last:
        shutil.copytree(best, run.checkpoints / "best")
        out["best_step"] = str(checkpoint_step(best))
    else:
        shutil.copytree(last, run.checkpoints / "best")
        out["best_step"] = str(checkpoint_step(last))
    last.rename(run.checkpoints / "last")
    out["last_step"] = str(checkpoint_step(last))
    for extra in run.checkpoints.glob("checkpoint-*"):
        shutil.rmtree(extra)
    return out
