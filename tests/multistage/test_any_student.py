"""Students of another architecture than the teacher's: another width (a learned projection to the
teacher's embedding size, saved as the sentence-transformers pipeline's Dense) and another
tokenizer (the student's own), through MSE, a bottleneck stage and a recurrence stage."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from deltakd import pipeline as msrun
from deltakd.multistage.evaluate import hf_encoder, st_encoder
from deltakd.multistage.saving import export_plain, load_student, save_student
from deltakd.multistage.structure import (
    add_projection,
    embedding_dim,
    multistage_spec,
    projection_of,
)

from .test_run import (  # noqa: F401
    ADJ,
    NOUN,
    PLACE,
    VERB,
    logged_losses,
    sentence,
    teacher_dir,
    world,
)

STUDENT_WIDTH, TEACHER_WIDTH = 24, 32


def _vocab() -> dict[str, int]:
    """A WordPiece vocabulary of the toy world's words (all three languages) plus single characters."""
    words: set[str] = {"the", "die", "la"}
    for table in (ADJ, NOUN, VERB, PLACE):
        for en, (de, fr) in table.items():
            for w in (en, de, fr):
                words.update(w.lower().replace("'", " ' ").split())
    chars = sorted({c for w in words for c in w})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words), *chars, *(f"##{c}" for c in chars)]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


@pytest.fixture(scope="module")
def other_student(tmp_path_factory) -> Path:
    """An XLM-R-architecture student, 4 layers of hidden 24 (the teacher: BERT, hidden 32), with its own
    WordPiece tokenizer over ~100 tokens (the teacher's: MiniLM's 30,522)."""
    from transformers import BertTokenizer, XLMRobertaConfig, XLMRobertaModel

    out = tmp_path_factory.mktemp("other-student")
    tok = BertTokenizer(vocab=_vocab(), do_lower_case=True)
    torch.manual_seed(1)
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=STUDENT_WIDTH, num_hidden_layers=4, num_attention_heads=2,
                           intermediate_size=48, max_position_embeddings=40, pad_token_id=tok.pad_token_id,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    XLMRobertaModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _recipes(root: Path, world: dict[str, Path], student: Path) -> list[Path]:  # noqa: F811
    common = (f"family: multistage\nteacher: {{model: {world['teacher']}}}\n"
              f"data: {{train: [{world['de']}, {world['fr']}], heldout: 4, max_length: 16}}\n"
              f"eval: {{before: true, speed_sentences: 8}}\n"
              "train: {max_steps: 16, batch_size: 8, lr: 2.0e-3, logging_steps: 4, warmup_ratio: 0.0, seed: 0}\n"
              f"output_dir: {root / 'runs'}\n")
    stages = {
        "s1_mse": f"student: {{model: {student}}}\nloss: {{mse: 1.0}}\n",
        "s2_bottleneck": "init_from: s1_mse\nstudent: {bottleneck: {dim: 8}}\nloss: {mse: 1.0}\n",
        "s3_recurrence": ("init_from: s2_bottleneck\nstudent: {bottleneck: {dim: 8}, recurrence: {keep: [0, 2]}}\n"
                          "loss: {mse: 1.0, mcl: 0.5}\n"),
    }
    paths = []
    for name, text in stages.items():
        p = root / f"{name}.yaml"
        p.write_text(f"name: {name}\n{common}{text}", encoding="utf-8")
        paths.append(p)
    return paths


def test_projection_round_trips_through_both_saved_forms(other_student, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other_student)
    student = load_student(other_student)
    assert embedding_dim(student) == STUDENT_WIDTH and multistage_spec(student) is None
    proj = add_projection(student, TEACHER_WIDTH)
    assert isinstance(proj, nn.Linear) and (proj.in_features, proj.out_features) == (STUDENT_WIDTH, TEACHER_WIDTH)
    assert embedding_dim(student) == TEACHER_WIDTH
    assert multistage_spec(student) == {"bottleneck_dim": None, "bottleneck_bias": None, "layer_pattern": None,
                                        "projection": [STUDENT_WIDTH, TEACHER_WIDTH, True]}
    assert projection_of(export_plain(student)) is None  # the plain architecture, no extra module
    save_student(student, tmp_path, tokenizer=tok, normalize=True, max_seq_length=16)
    sentences = ["the red cat sleeps outside", "die alte Kuh singt heute", "la petite fille court dehors"]
    ours = hf_encoder(student, tok, max_length=16, normalize=True)(sentences)  # (3, 32)
    st = SentenceTransformer(str(tmp_path), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Dense", "Normalize"]
    theirs = st_encoder(st)(sentences)
    assert theirs.shape == (3, TEACHER_WIDTH)
    assert torch.allclose(theirs, ours, atol=1e-5)
    back = load_student(tmp_path)  # the compact form keeps the projection with its weights
    assert torch.equal(projection_of(back).weight, proj.weight) and torch.equal(projection_of(back).bias, proj.bias)
    assert torch.allclose(hf_encoder(back, tok, max_length=16, normalize=True)(sentences), ours, atol=1e-6)


def test_student_of_another_width_and_tokenizer_trains_through_mse_bottleneck_and_recurrence(
        world, other_student, tmp_path):  # noqa: F811
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    outcomes = msrun.run_pipeline(_recipes(tmp_path, world, other_student))
    assert [o.status for o in outcomes] == ["trained", "trained", "trained"]
    results = [json.loads((o.run_dir / "results.json").read_text()) for o in outcomes]
    projection = [STUDENT_WIDTH, TEACHER_WIDTH, True]
    assert results[0]["built"] == [f"projection {STUDENT_WIDTH} -> {TEACHER_WIDTH} (the teacher's width)"]
    assert results[0]["structure"] == {"bottleneck_dim": None, "bottleneck_bias": None, "layer_pattern": None,
                                       "projection": projection}
    assert results[1]["structure"] == {"bottleneck_dim": 8, "bottleneck_bias": True, "layer_pattern": None,
                                       "projection": projection}
    assert results[2]["structure"] == {"bottleneck_dim": 8, "bottleneck_bias": True, "layer_pattern": [0, 1, 0, 1],
                                       "projection": projection}
    assert results[2]["params"]["total"] < results[1]["params"]["total"] < results[0]["params"]["total"]
    for o, res in zip(outcomes, results):
        losses = logged_losses(o.run_dir)  # 4 logs: each stage's loss falls
        assert len(losses) == 4 and losses[-1] < losses[0], (o.name, losses)
    # the MSE stage brings the student's translations closer to the teacher on held-out pairs
    assert results[0]["metrics"]["heldout"]["avg/mse"] < results[0]["before"]["heldout"]["avg/mse"]
    # the saved folder: a sentence-transformers model with the student's tokenizer that outputs
    # teacher-sized embeddings, equal to the trained student's
    model_dir = outcomes[-1].run_dir / "model"
    st = SentenceTransformer(str(model_dir), device="cpu")
    assert [type(m).__name__ for m in st][:3] == ["Transformer", "Pooling", "Dense"]
    assert st.get_embedding_dimension() == TEACHER_WIDTH
    assert len(st.tokenizer) == len(_vocab()) < 1000  # its own vocabulary, not the teacher's 30,522
    assert st[0].auto_model.config.hidden_size == STUDENT_WIDTH
    combos = list(itertools.islice(itertools.product(ADJ, NOUN, VERB, PLACE), 4))
    sentences = [sentence(c, i) for c, i in zip(combos, (None, 0, 1, None))]
    saved = st_encoder(st)(sentences)
    assert saved.shape == (4, TEACHER_WIDTH)
    compact = load_student(model_dir)
    assert multistage_spec(compact) == results[2]["structure"]
    ours = hf_encoder(compact, AutoTokenizer.from_pretrained(model_dir), max_length=16)(sentences)
    assert torch.allclose(saved, ours, atol=1e-5)
    assert results[2]["params"]["portable"] == sum(p.numel() for p in st.parameters())


def test_a_projected_student_resumes_from_its_checkpoint(world, other_student, tmp_path, monkeypatch):  # noqa: F811
    """Trainer checkpoints hold the projection (a sub-module of the student): an interrupted stage
    resumes from the newest complete one, projection included, and saves a loadable folder."""
    from safetensors import safe_open
    from sentence_transformers import SentenceTransformer

    import deltakd.runner.lifecycle as engine

    [s1, *_] = _recipes(tmp_path, world, other_student)
    sets = ["train.eval_every=8", "train.save_total_limit=3"]
    real = engine.keep_best_and_last

    def crash(*a, **k):
        raise RuntimeError("killed after training")

    monkeypatch.setattr(engine, "keep_best_and_last", crash)
    with pytest.raises(RuntimeError):
        msrun.run_pipeline([s1], sets)
    monkeypatch.setattr(engine, "keep_best_and_last", real)
    [run_dir] = list((tmp_path / "runs" / "s1_mse").iterdir())
    with safe_open(str(run_dir / "checkpoints" / "checkpoint-8" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("deltakd_projection.weight").shape == (TEACHER_WIDTH, STUDENT_WIDTH)
    (run_dir / "checkpoints" / "checkpoint-16" / "trainer_state.json").unlink()  # half-written
    [out] = msrun.run_pipeline([s1], sets)
    assert out.status == "resumed" and out.run_dir == run_dir
    res = json.loads((run_dir / "results.json").read_text())
    assert res["resumed_from"] == "checkpoint-8" and res["train_steps"] == 16
    assert res["structure"]["projection"] == [STUDENT_WIDTH, TEACHER_WIDTH, True]
    st = SentenceTransformer(str(run_dir / "model"), device="cpu")
    assert st.encode(["the red cat sleeps outside"], convert_to_tensor=True).shape == (1, TEACHER_WIDTH)


@pytest.mark.slow
def test_torchrun_pipeline_of_a_projected_student(world, other_student, tmp_path):  # noqa: F811
    """``deltakd pipeline`` under torchrun (2 gloo processes): a student of another width and
    tokenizer through MSE then a bottleneck stage with MCL; every process goes on to the second
    stage from the first one's run (written by the main process)."""
    import os
    import subprocess
    import sys

    from sentence_transformers import SentenceTransformer

    from ..conftest import ROOT

    s1, s2, _ = _recipes(tmp_path, world, other_student)
    s2.write_text(s2.read_text().replace("loss: {mse: 1.0}", "loss: {mse: 1.0, mcl: 0.5}"), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "deltakd.cli",
                          "pipeline", str(s1), str(s2), "--set", "train.batch_size=4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    [r1] = list((tmp_path / "runs" / "s1_mse").iterdir())
    [r2] = list((tmp_path / "runs" / "s2_bottleneck").iterdir())
    res1, res2 = (json.loads((r / "results.json").read_text()) for r in (r1, r2))
    assert res2["init_from"] == str(r1) and res1["train_steps"] == res2["train_steps"] == 16
    assert res2["structure"] == {"bottleneck_dim": 8, "bottleneck_bias": True, "layer_pattern": None,
                                 "projection": [STUDENT_WIDTH, TEACHER_WIDTH, True]}
    assert res2["losses"] == {"mse": 1.0, "mcl": 0.5}
    st = SentenceTransformer(str(r2 / "model"), device="cpu")
    assert st.encode(["die alte Kuh singt heute"], convert_to_tensor=True).shape == (1, TEACHER_WIDTH)
