"""End to end on the tiny BERT: library (grid, early stopping), estimators, fusion, k-shot targets, table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from deltakd.errors import DeltakdError

from ..conftest import sentiment_rows, write_tsv

ESTIMATORS = ["task_groups", "cosine", "loss"]


def _recipe(root: Path, backbone: Path) -> dict:
    tasks = {}
    for i, name in enumerate(["pos", "pos2", "neg"]):
        flip = name == "neg"  # the same words with the opposite labels
        for split, n, seed in (("train", 96, 10 * i + 1), ("dev", 32, 10 * i + 2), ("test", 32, 10 * i + 3)):
            rows = [(x, 1 - y if flip else y) for x, y in sentiment_rows(n, seed)]
            write_tsv(root / "data" / name / f"{split}.tsv", rows)
        tasks[name] = {"name": name, "data_dir": str(root / "data" / name), "text_columns": ["sentence"],
                       "label_column": "label", "max_length": 24}
    return {
        "name": "tiny-transfer", "description": "tiny end-to-end transfer", "output_dir": str(root / "out"),
        "transfer": {
            "backbone": str(backbone), "peft": {"method": "lora", "r": 2, "alpha": 4},
            "tasks": tasks, "sources": ["pos", "pos2", "neg"], "targets": ["pos"],
            "groups": {"positive": ["pos", "pos2"], "negative": ["neg"]},
            "library": {"dir": str(root / "lib"), "grid": {"lr": [2e-2, 5e-3], "batch_size": [16]},
                        "train": {"max_steps": 6, "eval_every": 3, "early_stop": 2, "logging_steps": 3}},
            "target": {"k": 16, "seeds": [1, 2],
                       "train": {"max_steps": 4, "lr": 1e-2, "batch_size": 8, "eval_every": 4, "logging_steps": 2}},
            "estimate": {"estimators": ESTIMATORS, "steps": 2, "batch_size": 8, "dev_samples": 16},
            "fusion": {"factor_baseline": True},
        },
    }


@pytest.fixture(scope="module")
def experiment(tiny_bert, tmp_path_factory):
    from deltakd.transfer.run import run_transfer

    root = tmp_path_factory.mktemp("transfer")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(_recipe(root, tiny_bert)))
    return path, run_transfer(path, progress=False)


def test_leave_one_out_weights_and_table(experiment):
    from deltakd.transfer.run import starts_of

    path, res = experiment
    assert res.starts == ["random", "uniform", "best_single", "uniform_factors", *ESTIMATORS]
    assert len(res.estimates) == 2  # one target x two seeds
    for e in res.estimates:
        assert e.sources == ["pos2", "neg"]  # the target's own module never takes part
        for start, w in e.weights.items():
            assert len(w) == 2 and math.isclose(sum(w), 1.0, abs_tol=1e-9), start
        assert e.weights["uniform"] == [0.5, 0.5]
        assert sorted(e.weights["best_single"]) == [0.0, 1.0]
        assert e.scores["task_groups"] == [1.0, 0.0]  # pos2 shares the target's group
        # two z-scored sources at temperature 1: softmax(+1, -1)
        assert e.weights["task_groups"][0] == pytest.approx(1 / (1 + math.exp(-2)))
    # the table has every start, mean ± std over the two seeds
    md = (res.out_dir / "results.md").read_text()
    for start in res.starts:
        assert f"| {start} |" in md or f"| **{start}** |" in md
    rows = list(csv.DictReader((res.out_dir / "results.csv").open()))
    assert {r["start"] for r in rows} == set(res.starts)
    for r in rows:
        assert int(r["n"]) == 2 and 0.0 <= float(r["mean"]) <= 1.0
        if r["target"] == "pos":
            vals = [float(v) for v in r["values"].split()]
            assert float(r["mean"]) == pytest.approx(sum(vals) / 2, abs=1e-4)
    png = (res.out_dir / "weights.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    weights = list(csv.DictReader((res.out_dir / "weights.csv").open()))
    assert {w["source"] for w in weights} == {"pos2", "neg"}
    assert len(res.runs) == 2 * len(starts_of(res_recipe(path)))


def res_recipe(path):
    from deltakd.transfer.recipe import load_transfer_recipe

    return load_transfer_recipe(path)


def test_library_modules_have_metadata_and_best_grid_cell(experiment):
    _, res = experiment
    for name, mod in res.modules.items():
        meta = json.loads((mod.path / "meta.json").read_text())
        assert meta["task"] == name and meta["method"] == "lora" and meta["labels"] == ["0", "1"]
        assert set(meta["metrics"]) >= {"valid", "test"}
        cells = meta["grid_results"]
        assert len(cells) == 2 and sum(c["best"] for c in cells) == 1
        best = next(c for c in cells if c["best"])
        assert best["mean"]["valid_accuracy"] == max(c["mean"]["valid_accuracy"] for c in cells)
        assert meta["setting"]["train.lr"] == best["setting"]["train.lr"]
        assert any(k.endswith("lora_A.weight") for k in mod.state)


def test_fused_start_is_the_weighted_sum_of_source_updates(experiment):
    """The fused module loaded at the start of training: dW = s * B @ A is the best rank-r
    approximation of sum_i w_i s_i B_i A_i (Eckart-Young: the error is the tail singular values)."""
    from safetensors.torch import load_file

    from deltakd.transfer.fuse import merged_lora_delta
    from deltakd.transfer.state_dicts import lora_delta_weights, lora_pairs

    _, res = experiment
    est = res.estimates[0]
    mods = [res.modules[s] for s in est.sources]
    start = "cosine"
    fused = load_file(str(res.out_dir / "fused" / f"pos--{start}--s{est.seed}.safetensors"))
    assert not any("classifier" in k for k in fused)  # heads start fresh
    exact = merged_lora_delta([{k: v.double() for k, v in m.state.items() if "classifier" not in k} for m in mods],
                              est.weights[start], source_scaling=[m.scaling for m in mods])
    got = lora_delta_weights({k: v.double() for k, v in fused.items()}, mods[0].scaling)
    assert set(got) == set(exact) and len(got) == 4  # query + value in 2 layers
    r = 2
    for module, dw in exact.items():
        s = torch.linalg.svdvals(dw)
        tail = float(s[r:].pow(2).sum().sqrt())
        err = float((got[module] - dw).norm())
        assert err == pytest.approx(tail, rel=1e-3, abs=1e-6)
        assert float(dw.norm()) > 10 * max(tail, 1e-9) or tail < 1e-6 or err <= tail * 1.001
    # the factor-wise baseline is a different start
    naive = load_file(str(res.out_dir / "fused" / f"pos--uniform_factors--s{est.seed}.safetensors"))
    pairs, _ = lora_pairs(naive)
    a_key = next(iter(pairs.values())).a_key
    assert torch.allclose(naive[a_key].double(), 0.5 * mods[0].state[a_key].double() + 0.5 * mods[1].state[a_key].double(),
                          atol=1e-6)


def test_target_runs_start_from_the_fused_module_and_rerun_skips(experiment):

    from deltakd.transfer.run import run_transfer

    path, res = experiment
    manifest = json.loads((res.out_dir / "runs.json").read_text())
    assert manifest["pos--random--s1"]["init"] == "random"
    assert manifest["pos--loss--s2"]["sources"] == ["pos2", "neg"]
    # k-shot: 16 training examples, seeded (different draws per seed)
    r1 = json.loads((Path(manifest["pos--random--s1"]["run_dir"]) / "results.json").read_text())
    assert r1["examples"]["train"] == 16
    again = run_transfer(path, progress=False)
    assert {r.status for r in again.runs} == {"skipped"}
    assert [r.value for r in again.runs] == [r.value for r in res.runs]
    # the reuse key names the fusion's inputs, not the fused values (which vary in the last bits
    # with thread count): a manifest from before (a digest of the fused values) is still reused
    fused_key = manifest["pos--loss--s2"]["init"]
    assert fused_key.startswith("fusion:")
    legacy = json.loads((res.out_dir / "runs.json").read_text())
    for name, entry in legacy.items():
        if entry["init"] != "random":
            entry["init"] = "0" * 64
    (res.out_dir / "runs.json").write_text(json.dumps(legacy))
    third = run_transfer(path, progress=False)
    assert {r.status for r in third.runs} == {"skipped"}
    assert json.loads((res.out_dir / "runs.json").read_text())["pos--loss--s2"]["init"] == fused_key
    # ... unless its stored weights differ from today's: then the run is trained again
    legacy["pos--loss--s2"]["weights"] = [0.9, 0.1]
    legacy["pos--loss--s2"]["init"] = "0" * 64
    (res.out_dir / "runs.json").write_text(json.dumps(legacy))
    fourth = run_transfer(path, progress=False)
    assert {(r.target, r.start, r.seed) for r in fourth.runs if r.status == "ran"} == {("pos", "loss", 2)}


def test_fusion_key_names_the_inputs():
    from deltakd.transfer.library import SourceModule
    from deltakd.transfer.run import fusion_key

    a = SourceModule("a", Path("a"), {}, {"w": torch.ones(2, 2)})
    b = SourceModule("b", Path("b"), {}, {"w": torch.zeros(2, 2)})
    key = fusion_key("cosine", [a, b], [0.25, 0.75], {"lora": "svd"}, 1)
    assert key == fusion_key("cosine", [a, b], [0.25, 0.75 + 1e-13], {"lora": "svd"}, 1)
    b2 = SourceModule("b", Path("b"), {}, {"w": torch.full((2, 2), 1e-7)})
    assert len({key, fusion_key("cosine", [a, b], [0.3, 0.7], {"lora": "svd"}, 1),
                fusion_key("cosine", [a, b2], [0.25, 0.75], {"lora": "svd"}, 1),
                fusion_key("cosine", [a, b], [0.25, 0.75], {"lora": "factors"}, 1),
                fusion_key("loss", [a, b], [0.25, 0.75], {"lora": "svd"}, 1),
                fusion_key("cosine", [a, b], [0.25, 0.75], {"lora": "svd"}, 2)}) == 6


def test_bad_transfer_recipes_fail_with_one_line_and_write_nothing(tiny_bert, tmp_path):
    from deltakd.transfer.recipe import load_transfer_recipe
    from deltakd.transfer.run import run_transfer

    data = _recipe(tmp_path, tiny_bert)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    cases = [
        (["transfer.targets=[nope]"], "transfer.targets: ['nope'] are not in transfer.tasks"),
        (["transfer.estimate.estimators=[cosine, magic]"], "unknown ['magic']"),
        (["transfer.sources=[pos]"], "'pos' has no source left"),
        (["transfer.peft.method=ia3"], "is not a known method"),
        (["transfer.target.k=0"], "transfer.target.k: 0 is not allowed"),
        (["transfer.groups=null"], "task_groups estimator needs groups"),
    ]
    for overrides, expected in cases:
        with pytest.raises(DeltakdError) as e:
            load_transfer_recipe(path, overrides)
        assert "\n" not in str(e.value) and expected in str(e.value), str(e.value)
    # a task whose k-shot draw cannot be made fails before any training, with nothing written
    with pytest.raises(DeltakdError, match="text_columns"):
        run_transfer(path, ["transfer.tasks.neg.label_column=null", "transfer.tasks.neg.text_columns=null"],
                     progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "lib").exists()


@pytest.mark.parametrize("peft", [{"method": "bottleneck", "placement": "pfeiffer", "reduction_factor": 4},
                                  {"method": "prefix", "num_virtual_tokens": 3}], ids=["bottleneck", "prefix"])
def test_adapter_and_prefix_modules_transfer_end_to_end(tiny_bert, tmp_path, peft):
    """The same experiment with bottleneck adapters / prefixes: every start trains, and each fused
    start is the weighted parameter average of the leave-one-out source modules (heads fresh)."""
    from safetensors.torch import load_file

    from deltakd.transfer.run import run_transfer

    data = _recipe(tmp_path, tiny_bert)
    t = data["transfer"]
    t["peft"] = peft
    t["fusion"] = {"factor_baseline": False}
    t["estimate"]["estimators"] = ["cosine", "loss"]
    t["target"]["seeds"] = [1]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    res = run_transfer(path, progress=False)
    assert res.starts == ["random", "uniform", "best_single", "cosine", "loss"]
    assert {r.status for r in res.runs} == {"ran"} and len(res.runs) == 5
    assert all(0.0 <= r.value <= 1.0 for r in res.runs)
    [est] = res.estimates
    mods = [res.modules[s] for s in est.sources]
    assert all(m.meta["method"] == peft["method"] for m in mods)
    for start in ("uniform", "cosine"):
        fused = load_file(str(res.out_dir / "fused" / f"pos--{start}--s1.safetensors"))
        assert fused and not any("classifier" in k for k in fused)
        w = est.weights[start]
        for key, value in fused.items():
            want = sum(wi * m.state[key].double() for wi, m in zip(w, mods))
            torch.testing.assert_close(value.double(), want, atol=1e-6, rtol=1e-5)
    assert (res.out_dir / "results.md").is_file() and (res.out_dir / "weights.png").is_file()
