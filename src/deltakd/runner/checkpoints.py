"""Trainer checkpoints of a run: the newest complete one (resume), and ``best/`` + ``last/`` at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..runs import RunDir


def checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name.rsplit("-", 1)[-1])


def last_complete_checkpoint(folder: Path, prune: bool = True) -> str | None:
    """The newest checkpoint that was written completely; partial ones (a kill mid-save) are removed.

    The Trainer writes ``trainer_state.json`` after the weights, optimizer and RNG states, so a
    checkpoint whose state file parses is whole.
    """
    for ckpt in sorted(Path(folder).glob("checkpoint-*"), key=checkpoint_step, reverse=True):
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
            return str(ckpt)
        except (OSError, ValueError):
            if prune:
                shutil.rmtree(ckpt, ignore_errors=True)
    return None


def keep_best_and_last(run: RunDir, best: str | None) -> dict[str, str]:
    """Name the final Trainer checkpoint ``last`` and the best one ``best``; returns their steps."""
    ckpts = sorted(run.checkpoints.glob("checkpoint-*"), key=checkpoint_step)
    out: dict[str, str] = {}
    if not ckpts:
        return out
    last = ckpts[-1]
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
