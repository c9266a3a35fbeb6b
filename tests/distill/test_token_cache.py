"""The token-level teacher cache: per-token hidden states of the mapped teacher layers, from disk."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from deltakd import api
from deltakd.runs import RunDir

from ..conftest import FILLER, sentiment_rows, write_recipe, write_tsv


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """The synthetic sentiment task with 0-8 extra filler words per sentence: examples of different lengths."""
    d = tmp_path_factory.mktemp("toy-tokcache")
    for name, n, seed in (("train.tsv", 400, 1), ("dev.tsv", 100, 2)):
        rows = [(text + " " + " ".join(FILLER[: (i * 7) % 9]), y) for i, (text, y) in enumerate(sentiment_rows(n, seed))]
        write_tsv(d / name, [(t.strip(), y) for t, y in rows])
    return d


def _recipe(folder: Path, name: str, body: str) -> Path:
    return write_recipe(folder / f"{name}.yaml", f"name: {name}\noutput_dir: {folder / 'runs'}\n{body}")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_bert, toy) -> dict:
    """A 2-layer tiny BERT fine-tuned a few steps (its quality does not matter here)."""
    folder = tmp_path_factory.mktemp("tokcache-teacher")
    return api.train(_recipe(folder, "teacher", f"""
task: {{name: sst2, data_dir: {toy}, resplit_valid: 0.2, max_length: 16}}
model: {{name: {tiny_bert}}}
peft: {{method: full}}
train: {{max_steps: 8, lr: 1.0e-3, batch_size: 16, seed: 3}}
"""))


def _student(folder: Path, teacher: dict, toy: Path, name: str, distill: str, steps: int = 6) -> Path:
    return _recipe(folder, name, f"""
task: {{name: sst2, data_dir: {toy}, resplit_valid: 0.2, max_length: 16}}
teacher: {{run: {teacher['run_dir']}}}
student: {{from_teacher: {{layers: [1]}}}}
peft: {{method: full}}
distill: {distill}
train: {{max_steps: {steps}, lr: 5.0e-3, batch_size: 16, seed: 5, logging_steps: 1}}
""")


def _losses(run_dir: str) -> list[tuple[int, float, float, float]]:
    """(step, loss, loss_hidden_mse, loss_attention_kl) of every logged training step."""
    return [(e["step"], e["loss"], e["loss_hidden_mse"], e["loss_attention_kl"])
            for e in RunDir(Path(run_dir)).read_events() if "loss_hidden_mse" in e]


@pytest.fixture(scope="module")
def teacher_and_data(teacher_run):
    from transformers import AutoTokenizer

    from deltakd.data import load_task
    from deltakd.data.tokenize import tokenize_examples
    from deltakd.models.delta import find_model_dir, load_trained
    from deltakd.runs import load_run_recipe

    teacher, _ = load_trained(find_model_dir(teacher_run["run_dir"]))
    tok = AutoTokenizer.from_pretrained(find_model_dir(teacher_run["run_dir"]))
    recipe = load_run_recipe(Path(teacher_run["run_dir"]))
    ds = tokenize_examples(load_task(recipe.task, 3).splits["train"], tok, 16)
    return teacher.eval(), tok, ds


def test_cached_token_states_are_the_live_teachers_under_either_padding_side(teacher_and_data, tmp_path):
    from transformers import DataCollatorWithPadding

    from deltakd.distill import token_cache
    from deltakd.distill.layer_map import LayerMap
    from deltakd.losses import terms
    from deltakd.losses.terms import LossInputs

    teacher, tok, ds = teacher_and_data
    layer_map = LayerMap.build("average", 1, 2, [[0, 1]])
    cache = token_cache.load_or_build(teacher, ds, DataCollatorWithPadding(tok), 64, layer_map, 2, 20.0, root=tmp_path)
    assert cache is not None and cache.layers == (0, 1)
    lengths = [len(x) for x in ds["input_ids"]]
    assert len(set(lengths)) > 1  # examples of different lengths: stored without padding
    expected = token_cache.cache_bytes(np.array(lengths), 2, 32, 2, 2)  # sized before building
    assert expected == sum(lengths) * 2 * 32 * 2 + len(ds) * 2 * 2 + (len(ds) + 1) * 8
    assert cache.nbytes == expected and cache.hidden.shape == (sum(lengths), 2, 32)
    assert (cache.path / "hidden.npy").stat().st_size == pytest.approx(sum(lengths) * 2 * 32 * 2, abs=256)  # + header
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["tokens"] == sum(lengths) and meta["layers"] == [0, 1]

    idx = torch.tensor([5, 0, 77, 150])
    rows = [{k: ds[int(i)][k] for k in ("input_ids", "token_type_ids", "attention_mask")} for i in idx]
    with torch.no_grad():  # the teacher on the batch padded on the right (BERT's side: positions unchanged)
        right = teacher(**DataCollatorWithPadding(tok)(rows), output_hidden_states=True)
    for side in ("right", "left"):
        tok.padding_side = side
        batch = DataCollatorWithPadding(tok)(rows)
        mask = batch["attention_mask"].bool()
        assert not mask.all()  # some padding in this batch
        with torch.no_grad():
            live = teacher(**batch, output_hidden_states=True)
        cached = cache.lookup_tokens(idx, batch["attention_mask"])
        assert torch.allclose(cached.logits, right.logits, atol=2e-3, rtol=1e-3)
        for j in (0, 1):
            c, t = cached.hidden_states[j + 1], right.hidden_states[j + 1]  # (B, L, H)
            assert c.shape == t.shape
            # each example's tokens where this batch's mask puts them, as the teacher computes them (fp16 storage)
            right_mask = torch.zeros_like(mask)
            for b, n in enumerate(mask.sum(1).tolist()):
                right_mask[b, :n] = True
            assert torch.allclose(c[mask], t[right_mask], atol=5e-3, rtol=2e-3)
            assert c[~mask].abs().max() == 0  # padded positions: zeros, masked out by the losses
        if side == "left":  # BERT numbers positions from the padding: the live teacher itself changes, the cache not
            continue
        assert cached.hidden_states[0] is None  # the embeddings are no mapped layer: not stored
        # one step's hidden_mse (and cosine) from the cache is the live teacher's up to fp16 rounding
        student = type("Out", (), {"hidden_states": tuple(torch.randn_like(h) for h in live.hidden_states)})()
        x_live = LossInputs(kind="classification", student=student, labels=torch.zeros(4, dtype=torch.long),
                            teacher=live, mask=batch["attention_mask"], pairs=[(0, [0, 1])])
        x_cached = LossInputs(kind="classification", student=student, labels=torch.zeros(4, dtype=torch.long),
                              teacher=cached, mask=batch["attention_mask"], pairs=[(0, [0, 1])])
        assert terms.hidden_mse(x_cached).item() == pytest.approx(terms.hidden_mse(x_live).item(), rel=1e-3)
        assert terms.hidden_cos(x_cached).item() == pytest.approx(terms.hidden_cos(x_live).item(), rel=1e-3,
                                                                   abs=1e-5)
    tok.padding_side = "right"
    # the same teacher, data and layers: the same entry; another layer set: another entry
    again = token_cache.load_or_build(teacher, ds, DataCollatorWithPadding(tok), 64, layer_map, 2, 20.0, root=tmp_path)
    assert again.path == cache.path
    other = token_cache.load_or_build(teacher, ds, DataCollatorWithPadding(tok), 64, LayerMap.build("fixed", 1, 2, [1]),
                                      2, 20.0, root=tmp_path)
    assert other.path != cache.path and other.layers == (1,)
    # a batch whose tokens do not match the cached examples is refused, not silently misaligned
    with pytest.raises(RuntimeError, match="token counts"):
        cache.lookup_tokens(idx, torch.ones_like(batch["attention_mask"]))


def test_cached_attention_maps_are_the_live_teachers(teacher_and_data, tmp_path):
    from transformers import DataCollatorWithPadding

    from deltakd.distill import token_cache
    from deltakd.distill.layer_map import LayerMap
    from deltakd.losses import terms
    from deltakd.losses.terms import LossInputs

    teacher, tok, ds = teacher_and_data
    teacher.set_attn_implementation("eager")  # what prepare_distill sets for an attention loss
    cache = token_cache.load_or_build(teacher, ds, DataCollatorWithPadding(tok), 64, LayerMap.build("fixed", 1, 2, [1]),
                                      2, 20.0, root=tmp_path, hidden=False, attentions=True)
    lengths = np.array([len(x) for x in ds["input_ids"]])
    assert cache.hidden is None and cache.attentions.shape == ((lengths**2).sum(), 1, 2)  # (pairs, layers, heads)
    assert cache.nbytes == token_cache.cache_bytes(lengths, 1, 32, 2, 2, hidden=False, attentions=True)
    idx = torch.tensor([3, 77, 150, 0])
    rows = [{k: ds[int(i)][k] for k in ("input_ids", "token_type_ids", "attention_mask")} for i in idx]
    batch = DataCollatorWithPadding(tok)(rows)
    mask = batch["attention_mask"].bool()
    assert not mask.all()
    with torch.no_grad():
        live = teacher(**batch, output_attentions=True)
    cached = cache.lookup_tokens(idx, batch["attention_mask"], hidden=False, attentions=True)
    assert cached.attentions[0] is None and cached.hidden_states[2] is None  # layer 0 not mapped; no states stored
    c, t = cached.attentions[1], live.attentions[1]  # (B, A, L, L)
    assert c.shape == t.shape
    pairs = (mask[:, :, None] & mask[:, None, :])[:, None].expand_as(c)  # (B, A, L, L) real (query, key) pairs
    assert torch.allclose(c[pairs], t[pairs], atol=1e-3)  # fp16 probabilities
    assert c[~pairs].abs().max() == 0 and t[~pairs & mask[:, None, :, None].expand_as(t)].abs().max() < 1e-6
    g = torch.Generator().manual_seed(0)
    student = type("Out", (), {"attentions": tuple(torch.randn(t.shape, generator=g).softmax(-1) for _ in range(1))})()
    args = dict(kind="classification", student=student, labels=torch.zeros(4, dtype=torch.long),
                mask=batch["attention_mask"], pairs=[(0, [1])])
    assert terms.attention_kl(LossInputs(teacher=cached, **args)).item() == pytest.approx(
        terms.attention_kl(LossInputs(teacher=live, **args)).item(), rel=1e-3)


def test_random_maps_cache_every_teacher_layer():
    from deltakd.distill.layer_map import LayerMap
    from deltakd.distill.token_cache import cache_layers

    assert cache_layers(LayerMap.build("random", 3, 6, None, k=3)) == (0, 1, 2, 3, 4, 5)
    assert cache_layers(LayerMap.build("fixed", 3, 6, [0, 2, 4])) == (0, 2, 4)
    assert cache_layers(LayerMap.build("average", 2, 6, [[0, 1, 2], [2, 5]])) == (0, 1, 2, 5)


def test_token_losses_from_the_token_cache_never_run_the_teacher_and_learn_as_live(tmp_path, teacher_run, toy):
    distill = ("{losses: {ce: 0.4, kd: 0.2, hidden_mse: 0.2, attention_kl: 0.2}, "
               "layer_map: {mode: average, pairs: [[0, 1]]}")
    cached = api.train(_student(tmp_path, teacher_run, toy, "cached", distill + "}"))
    live = api.train(_student(tmp_path, teacher_run, toy, "live", distill + ", cache_teacher: false}"))
    assert cached["distill"]["teacher_forwards"] == 0 and "teacher-tokens" in cached["distill"]["teacher_cache"]
    assert live["distill"]["teacher_forwards"] == 6 and live["distill"]["teacher_cache"] is None
    a, b = _losses(cached["run_dir"]), _losses(live["run_dir"])
    assert [x[0] for x in a] == [x[0] for x in b] == list(range(1, 7))
    assert all(x[2] > 0 and x[3] > 0 for x in a)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-3, rtol=0)  # the same curve up to fp16 rounding
    # with the random map, every teacher layer is cached, and still no teacher forward
    rnd = api.train(_student(tmp_path, teacher_run, toy, "random", """
  losses: {ce: 0.5, hidden_cos: 0.5}
  layer_map: {mode: random, k: 1}""", steps=3))
    assert rnd["distill"]["teacher_forwards"] == 0
    assert json.loads((Path(rnd["distill"]["teacher_cache"]) / "meta.json").read_text())["layers"] == [0, 1]


def test_a_cache_over_the_disk_budget_falls_back_to_the_live_teacher_with_one_line(tmp_path, teacher_run, toy,
                                                                                   caplog, monkeypatch):
    monkeypatch.setenv("DELTAKD_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        res = api.train(_student(tmp_path, teacher_run, toy, "budget", """
  losses: {ce: 0.5, hidden_mse: 0.5}
  cache_max_gb: 1.0e-6""", steps=4))
    lines = [r.getMessage() for r in caplog.records if "teacher token cache" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "over distill.cache_max_gb 1e-06 GB" in lines[0] and "tokens x 1 layers x 32, 2 bytes each" in lines[0]
    assert res["distill"]["teacher_forwards"] == 4 and res["distill"]["teacher_cache"] is None
    assert not (tmp_path / "cache" / "teacher-tokens").exists()  # nothing built
