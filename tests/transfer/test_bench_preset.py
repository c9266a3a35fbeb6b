"""benchmarks/transfer.py: the full preset runs every registered estimator through the recipe."""

from __future__ import annotations

import importlib.util

from ..conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench_transfer", ROOT / "benchmarks" / "transfer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_full_preset_has_every_estimator_and_validates():
    from deltakd.transfer.estimators import ESTIMATORS
    from deltakd.transfer.recipe import load_transfer_recipe

    bench = _bench()
    full = bench.preset("full")
    every = [e for e in ESTIMATORS if e != "uniform"]
    assert full["estimators"] == every and {"kl_shift", "kl_original", "grand"} <= set(every) and len(every) == 11
    rec = load_transfer_recipe(bench.RECIPE, bench.overrides_for(full, "runs/x", None), check_files=False)
    assert rec.transfer.estimate.estimators == every
    # the recipe as written lists them too, and the other presets keep their own choice
    assert load_transfer_recipe(bench.RECIPE, check_files=False).transfer.estimate.estimators == every
    assert bench.preset("cpu")["estimators"] == ["task_groups", "cosine", "loss"]
