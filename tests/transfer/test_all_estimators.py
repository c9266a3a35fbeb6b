"""Every estimator through ``deltakd transfer`` on the tiny BERT, and the ``init_from`` start
(the original's ``train_checkpoint``): its target run starts from exactly the given module."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from deltakd.errors import DeltakdError

from .test_e2e import _recipe

ALL = ["task_groups", "cosine", "euclidean", "dev_change", "loss", "kl", "kl_shift", "el2n", "grand",
       "logits_labels", "kl_original"]
# the sign of each raw score (higher = more similar): minus a distance / loss / divergence / norm is <= 0
NON_POSITIVE = {"euclidean", "loss", "kl", "kl_shift", "el2n", "grand", "kl_original"}


def _tiny(root: Path, backbone: Path) -> dict:
    data = _recipe(root, backbone)
    t = data["transfer"]
    t["library"]["grid"] = {"lr": [2e-2], "batch_size": [16]}
    t["target"]["seeds"] = [1]
    t["estimate"]["estimators"] = ["uniform", *ALL]
    # tuning that moves the dev accuracy (2 steps at 1e-3 leave it unchanged on the tiny model: dev_change ties)
    t["estimate"].update({"steps": 6, "lr": 5e-2, "dev_samples": 32})
    t["fusion"] = {"factor_baseline": False}
    return data


def _random_module(recipe_path: Path, seed: int = 7) -> dict[str, torch.Tensor]:
    """A delta module of the target model's exact shape with random (non-zero) values."""
    from deltakd.families import FAMILIES
    from deltakd.transfer.library import delta_state
    from deltakd.transfer.recipe import load_transfer_recipe
    from deltakd.transfer.run import target_recipe
    from deltakd.transfer.state_dicts import split_head

    rec = load_transfer_recipe(recipe_path)
    prep = FAMILIES["classification"].prepare(target_recipe(rec, "pos", "random", 1))
    state = split_head(delta_state(prep.model))[0]
    gen = torch.Generator().manual_seed(seed)
    return {k: (0.1 * torch.randn(v.shape, generator=gen)).contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def everything(tiny_bert, tmp_path_factory):
    from deltakd.transfer import run as run_mod

    root = tmp_path_factory.mktemp("transfer-all")
    data = _tiny(root, tiny_bert)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    given = _random_module(path)
    save_file(given, str(root / "given.safetensors"))
    data["transfer"]["target"]["init_from"] = str(root / "given.safetensors")
    path.write_text(yaml.safe_dump(data))
    # record the delta module each target run holds right after its start is loaded
    started: dict[str, dict[str, torch.Tensor]] = {}
    original = run_mod._loader

    def recording(fused):
        init = original(fused)

        def wrapped(prep) -> None:
            init(prep)
            started[prep.recipe.name] = {k: v.clone() for k, v in run_mod.delta_state(prep.model).items()}

        return wrapped

    run_mod._loader = recording
    try:
        res = run_mod.run_transfer(path, progress=False)
    finally:
        run_mod._loader = original
    return path, res, given, started


@pytest.mark.slow
def test_every_estimator_runs_end_to_end_with_distinct_weights(everything):
    _, res, _, _ = everything
    assert res.starts == ["random", "uniform", "best_single", "init_from", *ALL]
    [e] = res.estimates
    assert e.sources == ["pos2", "neg"]
    assert set(e.scores) == {"uniform", *ALL}
    for name in ALL:
        s, w = e.scores[name], e.weights[name]
        assert len(s) == 2 and all(math.isfinite(x) for x in s), (name, s)
        assert len(w) == 2 and all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in w), (name, w)
        assert math.isclose(sum(w), 1.0, abs_tol=1e-9), (name, w)
        # the two sources differ (one shares the target's labels, the other flips them): every estimator
        # tells them apart, so no estimator's weights are the uniform average
        assert s[0] != s[1] and abs(w[0] - 0.5) > 1e-3, (name, s, w)
        # two z-scored sources at temperature 1: softmax(+1, -1) on the higher score
        hi = 0 if s[0] > s[1] else 1
        assert w[hi] == pytest.approx(1 / (1 + math.exp(-2))), (name, w)
        if name in NON_POSITIVE:
            assert max(s) <= 1e-9, (name, s)
    assert e.weights["uniform"] == [0.5, 0.5] and e.scores["uniform"] == [0.0, 0.0]
    assert e.scores["task_groups"] == [1.0, 0.0]
    assert all(-1.0 <= x <= 1.0 for x in e.scores["cosine"] + e.scores["dev_change"])
    assert all(0.0 < x <= 1.0 for x in e.scores["logits_labels"])
    # every start trained one target run with a metric
    assert sorted(r.start for r in res.runs) == sorted(res.starts)
    assert {r.status for r in res.runs} == {"ran"} and all(0.0 <= r.value <= 1.0 for r in res.runs)
    saved = json.loads((res.out_dir / "estimates" / "pos--s1.json").read_text())
    assert saved["scores"]["kl_original"] == e.scores["kl_original"]
    md = (res.out_dir / "results.md").read_text()
    assert "| kl_original |" in md or "| **kl_original** |" in md


@pytest.mark.slow
def test_init_from_start_is_exactly_the_given_module(everything):
    from deltakd.transfer.library import given_module

    _, res, given, started = everything
    got = started["pos--init_from--s1"]
    delta = {k: v for k, v in got.items() if "classifier" not in k}
    assert set(delta) == set(given)
    for k, v in given.items():
        assert torch.equal(delta[k], v), k
    # a fused start is a different module (the check above can fail)
    assert not all(torch.equal(started["pos--uniform--s1"][k], v) for k, v in given.items())
    manifest = json.loads((res.out_dir / "runs.json").read_text())
    assert manifest["pos--init_from--s1"]["init"].startswith("given:")
    # a finished run and a library module folder are read as modules too: the source run of 'neg'
    mod = res.modules["neg"]
    want = {k: v for k, v in mod.state.items() if "classifier" not in k}
    for where in (mod.meta["run_dir"], mod.path):
        found = given_module(where)
        assert set(found) == set(want) and all(torch.equal(found[k], want[k]) for k in want)


@pytest.mark.slow
def test_bad_init_from_fails_with_one_line_exit_2_and_writes_nothing(tiny_bert, tmp_path):
    from deltakd.transfer.run import run_transfer

    data = _tiny(tmp_path, tiny_bert)
    data["transfer"]["estimate"]["estimators"] = ["loss"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "notes.txt").write_text("not a module")
    wrong = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in _random_module(path).items()}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    cases = [
        (tmp_path / "missing", "transfer.target.init_from: '{p}' does not exist"),
        (tmp_path / "notes.txt", "transfer.target.init_from: '{p}' is not a .safetensors file"),
        (tmp_path / "data", "transfer.target.init_from: "),  # a folder holding no run
        (tmp_path / "wrong.safetensors", "does not fit the target model"),
    ]
    for p, expected in cases:
        with pytest.raises(DeltakdError) as e:
            run_transfer(path, [f"transfer.target.init_from={p}"], progress=False)
        msg = str(e.value)
        assert "\n" not in msg and expected.format(p=p) in msg, msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "lib").exists()
    cli = subprocess.run([sys.executable, "-c", "from deltakd.cli import main; main()", "transfer", str(path),
                          f"transfer.target.init_from={tmp_path / 'missing'}"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert cli.returncode == 2, cli.stderr
    assert cli.stderr.strip() == f"error: transfer.target.init_from: '{tmp_path / 'missing'}' does not exist"
    assert not (tmp_path / "out").exists()
