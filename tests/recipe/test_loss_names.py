"""The recipe's loss names come from the loss table (deltakd.losses.table), read without torch."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError

from deltakd.losses import table
from deltakd.losses.table import LOSSES
from deltakd.recipe.schema import DistillConfig, LossName


def test_the_recipe_names_are_the_table_names():
    assert typing.get_args(LossName) == table.LOSS_NAMES == tuple(LOSSES)
    assert set(DistillConfig(losses=dict.fromkeys(LOSSES, 1.0)).losses) == set(LOSSES)
    with pytest.raises(ValidationError, match="'ce', 'kd', 'reverse_kl'.* or " + repr(table.LOSS_NAMES[-1])):
        DistillConfig(losses={"kl": 1.0})
    description = DistillConfig.model_fields["losses"].description
    assert all(f"{name}: {spec.doc}" in description for name, spec in LOSSES.items())


def test_the_recipe_reads_the_table_without_loading_torch():
    import deltakd

    code = "import sys, deltakd.recipe; print('torch' in sys.modules, 'deltakd.losses.terms' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(deltakd.__file__).parents[1])}  # this checkout's deltakd
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["False", "False"]
