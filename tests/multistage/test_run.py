"""End-to-end multistage runs on a tiny teacher: every recipe in recipes/multistage, the pipeline
(skip / re-train downstream / resume), the teacher cache, saved models in sentence-transformers,
bad input, the CLI."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from deltakd.errors import DeltakdError
from deltakd import pipeline as msrun
from deltakd.multistage import stage as msstage
from deltakd.multistage.evaluate import hf_encoder, st_encoder
from deltakd.multistage.recipe import load_multistage_recipe
from deltakd.multistage.saving import load_student
from deltakd.multistage.structure import layer_pattern, multistage_spec

from ..conftest import ROOT, write_tiny_bert

STAGES = ROOT / "recipes" / "multistage"
RECIPES = sorted(p for p in STAGES.glob("*.yaml") if not p.name.startswith("_"))

ADJ = {"red": ("rote", "rouge"), "big": ("große", "grande"), "old": ("alte", "vieille"),
       "small": ("kleine", "petite"), "happy": ("frohe", "heureuse"), "green": ("grüne", "verte")}
NOUN = {"cat": ("Katze", "chatte"), "dog": ("Hündin", "chienne"), "woman": ("Frau", "femme"),
        "girl": ("Tochter", "fille"), "cow": ("Kuh", "vache"), "bird": ("Meise", "mésange")}
VERB = {"sleeps": ("schläft", "dort"), "runs": ("läuft", "court"), "eats": ("isst", "mange"),
        "sings": ("singt", "chante")}
PLACE = {"outside": ("draußen", "dehors"), "at home": ("zu Hause", "à la maison"), "today": ("heute", "aujourd'hui")}


def sentence(combo: tuple[str, str, str, str], lang: int | None) -> str:
    a, n, v, p = combo
    if lang is None:
        return f"the {a} {n} {v} {p}"
    art = "die" if lang == 0 else "la"
    return f"{art} {ADJ[a][lang]} {NOUN[n][lang]} {VERB[v][lang]} {PLACE[p][lang]}"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, minilm_path) -> Path:
    """A 4-layer hidden-32 random BERT with MiniLM's tokenizer (a plain HF folder: the
    sentence-transformers teacher gets mean pooling)."""
    return write_tiny_bert(tmp_path_factory.mktemp("ms-teacher"), minilm_path, layers=4, positions=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_dir) -> dict[str, Path]:
    """Parallel files (en-de plain, en-fr gzip), a tiny stsb_multi_mt folder, a runs folder."""
    root = tmp_path_factory.mktemp("ms-world")
    combos = list(itertools.product(ADJ, NOUN, VERB, PLACE))
    rng = random.Random(0)
    rng.shuffle(combos)
    de = root / "train.en-de.tsv"
    de.write_text("".join(f"{sentence(c, None)}\t{sentence(c, 0)}\n" for c in combos[:40]), encoding="utf-8")
    fr = root / "train.en-fr.tsv.gz"
    with gzip.open(fr, "wt", encoding="utf-8") as f:
        f.write("".join(f"{sentence(c, None)}\t{sentence(c, 1)}\n" for c in combos[40:80]))
    sts = root / "sts"
    sts.mkdir()
    rows = [(combos[100 + i], combos[100 + (i * 7) % 12]) for i in range(12)]
    for lang, idx in (("en", None), ("de", 0), ("fr", 1)):
        with open(sts / f"stsb-{lang}-test.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            for a, b in rows:
                w.writerow([sentence(a, idx), sentence(b, idx), 5.0 * sum(x == y for x, y in zip(a, b)) / 4])
    return {"root": root, "de": de, "fr": fr, "sts": sts, "runs": root / "runs", "teacher": teacher_dir}


def tiny(world: dict[str, Path], path: Path, runs: Path | None = None) -> list[str]:
    """Overrides turning a real stage recipe into a seconds-long run on the tiny world."""
    raw = yaml.safe_load(path.read_text())
    out = [f"teacher.model={world['teacher']}", f"data.train=[{world['de']}, {world['fr']}]",
           "data.limit_per_file=null", "data.heldout=4", "data.max_length=16",
           f"eval.sts.data_dir={world['sts']}", "eval.speed_sentences=16", "eval.before=true",
           "train.max_steps=24", "train.batch_size=8", "train.lr=1.0e-3", "train.logging_steps=4",
           "train.warmup_ratio=0.0", f"output_dir={runs or world['runs']}"]
    if (raw.get("student") or {}).get("bottleneck"):
        out.append("student.bottleneck.dim=8")
    return out


def chain(path: Path) -> list[Path]:
    """The stage recipes ``path`` needs, in order (following init_from to recipes/multistage/<name>.yaml)."""
    stages = [path]
    while True:
        ref = yaml.safe_load(stages[0].read_text()).get("init_from")
        if not ref:
            return stages
        stages.insert(0, STAGES / f"{ref}.yaml")


def run_chain(world: dict[str, Path], path: Path, runs: Path | None = None, **kw) -> list[msrun.StageOutcome]:
    out = []
    for p in chain(path):  # per-stage overrides (only bottleneck stages get the bottleneck one)
        out.extend(msrun.run_pipeline([p], tiny(world, p, runs), **kw))
    return out


def logged_losses(run_dir: Path) -> list[float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if "loss" in e and "eval_loss" not in e]


def test_every_stage_recipe_is_covered():
    names = {p.stem for p in RECIPES}
    assert names == {"mse", "bottleneck_distill", "rec_distill", "rec_bottle_distill", "rec_bottle_mcl", "rec_mcl",
                     "rec_bottle_mse", "rec_bottle_bool", "rec_bottle_ce", "ablation_wo_all",
                     "ablation_wo_recursive"}
    for p in RECIPES:
        r = load_multistage_recipe(p, check_files=False)
        assert r.name == p.stem and r.description


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_stage_recipe_trains_end_to_end(world, path):
    outcomes = run_chain(world, path)
    last = outcomes[-1]
    assert last.name == path.stem and last.status in ("trained", "skipped")
    res = json.loads((last.run_dir / "results.json").read_text())
    recipe = load_multistage_recipe(path, tiny(world, path))
    # structure as the recipe says
    spec = res["structure"]
    if recipe.student.bottleneck:
        assert spec["bottleneck_dim"] == 8
    if recipe.student.recurrence:
        # 3 searched layers of the 4, each position running the nearest kept one (monotone)
        pattern = spec["layer_pattern"]
        assert len(pattern) == 4 and max(pattern) == 2 and pattern == sorted(pattern)
        assert any("recurrence search over 4 subsets" in b for b in res["built"]) or \
            (recipe.init_from and "rec_" in recipe.init_from)  # stage 4 keeps stage 3's structure
        assert res["params"]["total"] < res["params"]["teacher"]
    if spec is None:
        assert res["params"]["total"] == res["params"]["teacher"]
    if recipe.init_from:
        assert res["init_from"] == str(outcomes[-2].run_dir)
    # training made progress: logged loss falls
    losses = logged_losses(last.run_dir)
    assert len(losses) >= 4 and sum(losses[-2:]) / 2 < losses[0]
    # metrics per language and per STS set, in results.json
    held, test = res["metrics"]["heldout"], res["metrics"]["test"]
    for lang in ("de", "fr"):
        assert 0.0 <= held[f"{lang}/acc"] <= 1.0 and held[f"{lang}/mse"] >= 0.0
    for name in ("en-de", "en-fr"):
        assert -1.0 <= test[f"sts/{name}/spearman"] <= 1.0
    assert res["speed_sent_per_s"] > 0 and res["tested"] is True
    assert set(recipe.loss.weights()) >= set(res["losses"])
    if recipe.loss.weights() == {"mse": 1.0, "mcl": 0.0, "ce": 0.0, "bool": 0.0}:
        # pure distillation: the student is closer to the teacher on held-out pairs than before
        assert held["avg/mse"] < res["before"]["heldout"]["avg/mse"]
    # the saved folder is a plain sentence-transformers model giving the trained student's embeddings
    from sentence_transformers import SentenceTransformer

    model_dir = last.run_dir / "model"
    st = SentenceTransformer(str(model_dir), device="cpu")
    compact = load_student(model_dir)
    assert multistage_spec(compact) == spec
    sentences = [sentence(c, i) for c, i in zip(itertools.islice(itertools.product(ADJ, NOUN, VERB, PLACE), 5),
                                                (None, 0, 1, None, 0))]
    from transformers import AutoTokenizer

    ours = hf_encoder(compact, AutoTokenizer.from_pretrained(model_dir), max_length=16)(sentences)
    assert torch.allclose(st_encoder(st)(sentences), ours, atol=1e-5)


def test_pipeline_rerun_skips_and_retrains_what_follows_a_retrained_stage(world, tmp_path):
    runs = tmp_path / "runs"
    first = run_chain(world, STAGES / "rec_bottle_distill.yaml", runs)
    assert [o.status for o in first] == ["trained", "trained"]
    again = run_chain(world, STAGES / "rec_bottle_distill.yaml", runs)
    assert [o.status for o in again] == ["skipped", "skipped"]
    assert [o.run_dir for o in again] == [o.run_dir for o in first]
    # a new description alone trains nothing again; a changed setting does
    b = STAGES / "bottleneck_distill.yaml"
    worded = msrun.run_pipeline([b], [*tiny(world, b, runs), "description=reworded"])
    assert worded[0].status == "skipped" and worded[0].run_dir == first[0].run_dir
    changed = msrun.run_pipeline([b], [*tiny(world, b, runs), "train.lr=5.0e-4"])
    assert changed[0].status == "trained"
    # re-train the first stage: the second was initialised from the old run, so it trains again
    redo = msrun.run_pipeline([b], tiny(world, b, runs), force=True)
    assert redo[0].status == "trained" and redo[0].run_dir != first[0].run_dir
    third = run_chain(world, STAGES / "rec_bottle_distill.yaml", runs)
    assert [o.status for o in third] == ["skipped", "trained"]
    res = json.loads((third[1].run_dir / "results.json").read_text())
    assert res["init_from"] == str(redo[0].run_dir)


def test_pipeline_resumes_an_interrupted_stage_and_tests_an_untested_one(world, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    p = STAGES / "mse.yaml"
    import deltakd.runner.lifecycle as engine

    real = engine.keep_best_and_last

    def crash(*a, **k):
        raise RuntimeError("killed after training")

    monkeypatch.setattr(engine, "keep_best_and_last", crash)
    sets = [*tiny(world, p, runs), "train.eval_every=8", "train.save_total_limit=3"]
    with pytest.raises(RuntimeError):
        msrun.run_pipeline([p], sets)
    monkeypatch.setattr(engine, "keep_best_and_last", real)
    [run_dir] = list((runs / "mse").iterdir())
    ckpts = sorted(c.name for c in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert not (run_dir / "results.json").exists() and ckpts == ["checkpoint-16", "checkpoint-24", "checkpoint-8"]
    # as if killed between steps 16 and 24: the last checkpoint half-written
    (run_dir / "checkpoints" / "checkpoint-24" / "trainer_state.json").unlink()
    out = msrun.run_pipeline([p], sets, test=False)
    assert out[0].status == "resumed" and out[0].run_dir == run_dir
    res = json.loads((run_dir / "results.json").read_text())
    assert res["resumed_from"] == "checkpoint-16" and res["train_steps"] == 24 and res["tested"] is False
    steps = [e["step"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # events after step 16 logged once
    tested = msrun.run_pipeline([p], sets)
    assert tested[0].status == "tested" and tested[0].run_dir == run_dir
    res = json.loads((run_dir / "results.json").read_text())
    assert res["tested"] and "de/acc" in res["metrics"]["heldout"] and (run_dir / "eval.json").is_file()


def test_teacher_embeddings_are_cached_once(world, monkeypatch):
    from deltakd.multistage import teacher as msteacher

    recipe = load_multistage_recipe(STAGES / "mse.yaml", tiny(world, STAGES / "mse.yaml"))
    stage = msstage.prepare_stage(recipe)
    assert stage.targets.path is not None and stage.targets.path.is_dir()
    expected = stage.teacher.encode(stage.split.train[0].english, convert_to_tensor=True).float()
    assert torch.allclose(stage.targets.lookup([stage.split.train[0].english])[0], expected, atol=1e-5)
    # the English side of Multi30k-like data is shared across languages: embedded once
    assert len(stage.targets.sentences) == len({p.english for p in (*stage.split.train, *stage.split.heldout)})

    def no_encode(*a, **k):
        raise AssertionError("teacher ran again")

    monkeypatch.setattr(msteacher, "_encode", no_encode)
    again = msstage.prepare_stage(recipe)
    assert again.targets.path == stage.targets.path
    assert torch.equal(again.targets.embeddings, stage.targets.embeddings)


def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path):
    runs = tmp_path / "runs"
    p = STAGES / "rec_bottle_mcl.yaml"
    with pytest.raises(DeltakdError) as e:  # its earlier stage never ran here
        msrun.run_pipeline([p], tiny(world, p, runs))
    assert "init_from 'rec_bottle_distill': no finished run" in str(e.value) and "\n" not in str(e.value)
    assert not runs.exists()
    with pytest.raises(DeltakdError, match=r"unknown key 'loss.mlc'; allowed keys: bool, bool_bias, ce, mcl"):
        msrun.run_pipeline([p], [*tiny(world, p, runs), "loss.mlc=1"])
    with pytest.raises(DeltakdError, match="pair file '.*nope.tsv' does not exist"):
        msrun.run_pipeline([p], [*tiny(world, p, runs), "data.train=[nope.tsv]"])
    with pytest.raises(DeltakdError, match="every weight is 0"):
        msrun.run_pipeline([p], [*tiny(world, p, runs), "loss.mse=0", "loss.mcl=0"])
    bad = tmp_path / "bad.en-de.tsv"
    bad.write_text("only one column\n", encoding="utf-8")
    m = STAGES / "mse.yaml"
    with pytest.raises(DeltakdError, match=r"bad.en-de.tsv line 1: expected english<TAB>translation"):
        msrun.run_pipeline([m], [*tiny(world, m, runs), f"data.train=[{bad}]"])
    with pytest.raises(DeltakdError, match="k=8 distinct layers but the model has 4"):
        msrun.run_pipeline([STAGES / "ablation_wo_all.yaml"],
                           [*tiny(world, STAGES / "ablation_wo_all.yaml", runs), "student.recurrence.k=8"])
    assert not runs.exists()


def test_cli_pipeline_log_dir_init_from_no_test_then_eval(world, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from deltakd.cli import app

    logs = tmp_path / "logs"
    m = STAGES / "mse.yaml"
    sets = [x for o in tiny(world, m, tmp_path / "ignored") if not o.startswith("output_dir=")
            for x in ("--set", o)]
    runner = CliRunner()
    r = runner.invoke(app, ["pipeline", str(m), *sets, "--log-dir", str(logs), "--no-test"])
    assert r.exit_code == 0, r.output
    [run_dir] = list((logs / "mse").iterdir())
    res = json.loads((run_dir / "results.json").read_text())
    assert res["tested"] is False and res["metrics"] == {}
    r = runner.invoke(app, ["eval", str(run_dir)])
    assert r.exit_code == 0, r.output
    assert json.loads((run_dir / "results.json").read_text())["tested"] is True
    # start from a checkpoint (the mse model) with a stage that has no init_from of its own
    a = STAGES / "ablation_wo_all.yaml"
    sets = [x for o in tiny(world, a, tmp_path / "ignored") if not o.startswith("output_dir=")
            for x in ("--set", o)]
    r = runner.invoke(app, ["pipeline", str(a), *sets, "--log-dir", str(logs), "--init-from", str(run_dir)])
    assert r.exit_code == 0, r.output
    [a_dir] = list((logs / "ablation_wo_all").iterdir())
    assert json.loads((a_dir / "results.json").read_text())["init_from"] == str(run_dir)
    # bad input: one line on stderr, exit code 2 (through the console entry point)
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from deltakd.cli import main; main()", "pipeline", str(a),
                           *sets, "--set", "loss.temperature=-1", "--log-dir", str(logs)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "loss.temperature" in proc.stderr
    assert math.isfinite(json.loads((a_dir / "results.json").read_text())["speed_sent_per_s"])
    results = json.loads((a_dir / "results.json").read_text())
    assert layer_pattern(load_student(a_dir / "model")) == results["structure"]["layer_pattern"]
    assert max(results["structure"]["layer_pattern"]) == 2  # k = 3 of the 4 layers


def test_cli_train_runs_one_multistage_stage(world, tmp_path):
    from typer.testing import CliRunner

    from deltakd.cli import app

    m = STAGES / "bottleneck_distill.yaml"
    r = CliRunner().invoke(app, ["train", str(m), *tiny(world, m, tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    [run_dir] = list((tmp_path / "runs" / "bottleneck_distill").iterdir())
    res = json.loads((run_dir / "results.json").read_text())
    assert res["family"] == "multistage" and res["structure"]["bottleneck_dim"] == 8 and res["tested"]
    assert f"parameters: {res['params']['total']:,} total" in r.output


def test_recurrence_search_keeps_the_subset_closest_to_the_teacher(world, tmp_path):
    """search: true scores every 2-of-4 layer subset of the untrained student on training sentences
    and keeps the lowest MSE; the saved student has that structure and the scores are reported."""
    path = STAGES / "rec_distill.yaml"
    over = [*tiny(world, path, tmp_path / "runs"), "student.recurrence.k=2", "student.recurrence.search=true",
            "student.recurrence.order=nearest",
            "student.recurrence.search_sentences=16", "train.max_steps=2", "init_from=null"]
    [outcome] = msrun.run_pipeline([path], over)
    res = json.loads((outcome.run_dir / "results.json").read_text())
    notes = " | ".join(res["built"])
    assert "recurrence search over 6 subsets" in notes
    # re-score by hand: the chosen keep is the minimum of the reported best three
    recipe = load_multistage_recipe(path, over)
    stage = msstage.prepare_stage(recipe)
    from deltakd.multistage.recurrence import recurrence_pattern, search_keep

    from deltakd.multistage.saving import transformer_parts

    teacher_model = transformer_parts(stage.teacher)[0]
    sample = list(dict.fromkeys(p.english for p in stage.split.train))[:16]
    score = msstage._search_score(stage.tokenizer, sample, stage.targets, stage.normalize, 8)
    best, scored = search_keep(teacher_model, 2, 4, "nearest", score, progress=False)
    values = {tuple(c): v for c, v in scored}
    assert values[tuple(best)] == min(values.values()) and len(set(values.values())) > 1
    assert f"recurrence layers {best} as {recurrence_pattern('nearest', best, 4, 4)}" in notes
    assert res["structure"]["layer_pattern"] == recurrence_pattern("nearest", best, 4, 4)
    # the default evenly spread keep ([0, 2]) is no closer to the teacher than the chosen one
    assert values[(0, 2)] >= values[tuple(best)]


def test_recurrence_search_with_keep_is_refused(world, tmp_path):
    path = STAGES / "rec_distill.yaml"
    with pytest.raises(DeltakdError, match="give k, not keep"):
        load_multistage_recipe(path, [*tiny(world, path, tmp_path), "student.recurrence.search=true",
                                      "student.recurrence.k=null", "student.recurrence.keep=[0, 2]"])
