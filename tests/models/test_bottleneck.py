"""Bottleneck adapters (Houlsby / Pfeiffer) on tiny random BERT and GPT-2 models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from deltakd.models.bottleneck import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Bottleneck,
    BottleneckSpec,
    adapter_state_dict,
    add_bottleneck_adapters,
    bottleneck_modules,
    load_bottleneck,
    read_bottleneck_config,
    save_bottleneck,
)

HIDDEN = 32
LAYERS = 2
# One adapter with reduction_factor 16: bottleneck 32 // 16 = 2.
# down: 32*2 weights + 2 biases = 66; up: 2*32 weights + 32 biases = 96 -> 162 per adapter.
PER_ADAPTER = 32 * 2 + 2 + 2 * 32 + 32
BERT_HEAD = 32 * 2 + 2  # classifier: Linear(32, num_labels=2)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                     intermediate_size=64, vocab_size=100, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=2, vocab_size=100,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2}
HEAD_PARAMS = {"bert": BERT_HEAD, "gpt2": 0}  # GPT2LMHeadModel: no "classifier"/"score" params


def batch(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (3, 7), generator=g)
    if kind == "bert":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([0, 1, 1])}
    return {"input_ids": ids, "labels": ids}


def logits(model: torch.nn.Module, kind: str) -> torch.Tensor:
    b = {k: v for k, v in batch(kind).items() if k != "labels"}
    with torch.no_grad():
        return model(**b).logits


def features(model: torch.nn.Module, kind: str) -> torch.Tensor:
    """Last hidden states, (B, L, H): O(1) values, unlike the tiny logits of a random head."""
    b = {k: v for k, v in batch(kind).items() if k != "labels"}
    with torch.no_grad():
        return model(**b, output_hidden_states=True).hidden_states[-1]


def n_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- spec and module


def test_spec_defaults_and_validation():
    spec = BottleneckSpec()
    assert (spec.placement, spec.reduction_factor, spec.non_linearity, spec.init_scale) == (
        "pfeiffer", 16, "relu", 1e-3)
    with pytest.raises(ValueError, match="placement='parallel'"):
        BottleneckSpec(placement="parallel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction_factor=0"):
        BottleneckSpec(reduction_factor=0)
    with pytest.raises(ValueError, match="non_linearity='elu'.*relu"):
        BottleneckSpec(non_linearity="elu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init_scale=-1"):
        BottleneckSpec(init_scale=-1.0)
    with pytest.raises(ValueError, match=r"unknown bottleneck spec keys \['r'\]"):
        BottleneckSpec.from_dict({"r": 8})


def test_bottleneck_module_shapes_and_formula():
    torch.manual_seed(0)
    a = Bottleneck(32, reduction_factor=8, non_linearity="tanh", init_scale=0.5)
    assert a.bottleneck_size == 4
    assert a.down.weight.shape == (4, 32) and a.up.weight.shape == (32, 4)
    assert torch.count_nonzero(a.down.bias) == 0 and torch.count_nonzero(a.up.bias) == 0
    x = torch.randn(2, 5, 32)
    expected = x + (torch.tanh(x @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
    torch.testing.assert_close(a(x), expected)
    # reduction larger than hidden still keeps one unit; init_scale 0 is an exact identity
    b = Bottleneck(4, reduction_factor=64, init_scale=0.0)
    assert b.bottleneck_size == 1
    assert torch.equal(b(x[..., :4]), x[..., :4])


@pytest.mark.parametrize("name,act", [("relu", torch.relu), ("gelu", torch.nn.functional.gelu),
                                      ("swish", torch.nn.functional.silu), ("tanh", torch.tanh)])
def test_non_linearities(name, act):
    a = Bottleneck(8, reduction_factor=2, non_linearity=name)
    x = torch.linspace(-3, 3, 8)
    torch.testing.assert_close(a.act(x), act(x))


# ---------------------------------------------------------------- insertion


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("placement,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_adapter_count_and_trainable_params(kind, placement, per_layer):
    model = MODELS[kind]()
    total_before = sum(p.numel() for p in model.parameters())
    add_bottleneck_adapters(model, BottleneckSpec(placement=placement))
    adapters = bottleneck_modules(model)
    assert len(adapters) == per_layer * LAYERS
    # bert pfeiffer: 2*162 + 66 = 390; bert houlsby: 4*162 + 66 = 714;
    # gpt2 pfeiffer: 2*162 = 324;      gpt2 houlsby: 4*162 = 648.
    expected = {("bert", "pfeiffer"): 390, ("bert", "houlsby"): 714,
                ("gpt2", "pfeiffer"): 324, ("gpt2", "houlsby"): 648}[(kind, placement)]
    assert expected == per_layer * LAYERS * PER_ADAPTER + HEAD_PARAMS[kind]
    assert n_trainable(model) == expected
    total_after = sum(p.numel() for p in model.parameters())
    assert total_after == total_before + per_layer * LAYERS * PER_ADAPTER
    names = sorted(adapters)
    if kind == "bert":
        ffn = [f"bert.encoder.layer.{i}.output.adapter_ffn" for i in range(LAYERS)]
        attn = [f"bert.encoder.layer.{i}.attention.output.adapter_attn" for i in range(LAYERS)]
    else:
        ffn = [f"transformer.h.{i}.mlp.adapter_ffn" for i in range(LAYERS)]
        attn = [f"transformer.h.{i}.attn.adapter_attn" for i in range(LAYERS)]
    assert names == sorted(ffn + (attn if placement == "houlsby" else []))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_only_adapters_and_head_are_trainable(kind):
    model = add_bottleneck_adapters(MODELS[kind](), BottleneckSpec(placement="houlsby"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {"classifier.weight", "classifier.bias"} if kind == "bert" else set()
    adapter = {n for n in trainable if ".adapter_attn." in n or ".adapter_ffn." in n}
    assert trainable == adapter | head
    assert len(adapter) == 4 * 2 * LAYERS  # 4 tensors per adapter, 2 adapters per layer
    assert set(model.bottleneck_head_names) == head


def test_base_state_dict_keys_unchanged():
    base = tiny_bert()
    keys = set(base.state_dict())
    model = add_bottleneck_adapters(tiny_bert(), BottleneckSpec(placement="houlsby"))
    new = set(model.state_dict())
    assert keys <= new
    assert all(".adapter_" in k for k in new - keys)
    # base weights still load into the adapted model
    model.load_state_dict(base.state_dict(), strict=False)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_zero_init_is_base_model_and_perturbation_changes_it(kind, placement):
    base = MODELS[kind]()
    model = add_bottleneck_adapters(copy.deepcopy(base), BottleneckSpec(placement=placement,
                                                                        init_scale=0.0))
    torch.testing.assert_close(logits(model, kind), logits(base, kind), atol=1e-6, rtol=0)
    ref = features(base, kind)
    torch.testing.assert_close(features(model, kind), ref, atol=1e-6, rtol=0)
    with torch.no_grad():
        for a in bottleneck_modules(model).values():
            a.up.weight.normal_(std=0.5)
    assert (features(model, kind) - ref).abs().max() > 1e-2
    assert not torch.equal(logits(model, kind), logits(base, kind))


def test_default_init_is_near_base_model():
    base = tiny_bert()
    model = add_bottleneck_adapters(copy.deepcopy(base), BottleneckSpec())  # init_scale 1e-3
    diff = (features(model, "bert") - features(base, "bert")).abs().max()
    assert 0 < diff < 1e-2
    for a in bottleneck_modules(model).values():
        assert 0 < a.up.weight.std() < 3e-3


def test_each_site_perturbs_output():
    """Every hooked projection really feeds its own adapter (no adapter left unwired)."""
    base = tiny_bert()
    model = add_bottleneck_adapters(copy.deepcopy(base), BottleneckSpec("houlsby", init_scale=0.0))
    ref = features(base, "bert")
    for name, a in bottleneck_modules(model).items():
        with torch.no_grad():  # not a constant shift: LayerNorm would cancel that
            a.up.bias.normal_(std=0.5)
        assert (features(model, "bert") - ref).abs().max() > 1e-2, name
        with torch.no_grad():
            a.up.bias.zero_()
        torch.testing.assert_close(features(model, "bert"), ref, atol=1e-6, rtol=0)


def test_deepcopy_hooks_follow_the_copy():
    model = add_bottleneck_adapters(tiny_bert(), BottleneckSpec(init_scale=0.0))
    ref = features(model, "bert")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for a in bottleneck_modules(twin).values():
            a.up.weight.normal_(std=0.5)
    torch.testing.assert_close(features(model, "bert"), ref, atol=0, rtol=0)
    assert (features(twin, "bert") - ref).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_training_step_changes_adapters_only(kind):
    model = add_bottleneck_adapters(MODELS[kind](), BottleneckSpec(placement="houlsby"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model(**batch(kind)).loss
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # bit-identical
        else:
            assert not torch.equal(p, before[n]), n


@pytest.mark.parametrize("kind", ["distilbert", "llama"])
def test_other_supported_families(kind):
    torch.manual_seed(0)
    if kind == "distilbert":
        base = DistilBertForSequenceClassification(DistilBertConfig(
            dim=HIDDEN, n_layers=LAYERS, n_heads=2, hidden_dim=64, vocab_size=100)).eval()
        # head: pre_classifier Linear(32, 32) = 1056, classifier Linear(32, 2) = 66
        head, sites = 32 * 32 + 32 + BERT_HEAD, ["attention.adapter_attn", "ffn.adapter_ffn"]
    else:
        base = LlamaForCausalLM(LlamaConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=64, vocab_size=100)).eval()
        head, sites = 0, ["self_attn.adapter_attn", "mlp.adapter_ffn"]
    model = add_bottleneck_adapters(copy.deepcopy(base), BottleneckSpec("houlsby", init_scale=0.0))
    assert sorted(bottleneck_modules(model)) == sorted(
        f"{'distilbert.transformer.layer' if kind == 'distilbert' else 'model.layers'}.{i}.{s}"
        for i in range(LAYERS) for s in sites)
    assert n_trainable(model) == 2 * LAYERS * PER_ADAPTER + head
    ids = batch("gpt2")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-6, rtol=0)


def test_already_adapted_and_unsupported_architecture():
    model = add_bottleneck_adapters(tiny_bert(), BottleneckSpec())
    with pytest.raises(ValueError, match="already has bottleneck adapters"):
        add_bottleneck_adapters(model, BottleneckSpec())
    t5 = T5ForConditionalGeneration(T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32,
                                             d_kv=8, vocab_size=50))
    with pytest.raises(ValueError, match=r"architecture 't5' \(T5ForConditionalGeneration\).*bert"):
        add_bottleneck_adapters(t5, BottleneckSpec())
    assert all(p.requires_grad for p in t5.parameters())  # failed call left the model alone


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_save_load_round_trip(kind, placement, tmp_path):
    spec = BottleneckSpec(placement=placement, reduction_factor=8, non_linearity="gelu")
    model = add_bottleneck_adapters(MODELS[kind](), spec)
    with torch.no_grad():  # stand-in for training: move adapters and head away from their init
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    expected = logits(model, kind)
    state = adapter_state_dict(model)
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}

    save_bottleneck(model, tmp_path / "ckpt", spec, base_model_name_or_path="tiny-" + kind)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temp files left behind
    saved = load_file(str(tmp_path / "ckpt" / WEIGHTS_NAME))
    assert set(saved) == set(state)

    read_spec, meta = read_bottleneck_config(tmp_path / "ckpt")
    assert read_spec == spec
    assert meta["base_model_name_or_path"] == "tiny-" + kind
    assert sorted(meta["head_param_names"]) == (["classifier.bias", "classifier.weight"]
                                        if kind == "bert" else [])

    fresh = MODELS[kind]()  # same seed: the same "pretrained" base weights
    assert not torch.equal(logits(fresh, kind), expected)
    loaded = load_bottleneck(fresh, tmp_path / "ckpt")
    assert loaded is fresh
    assert len(bottleneck_modules(fresh)) == (2 if placement == "houlsby" else 1) * LAYERS
    torch.testing.assert_close(logits(fresh, kind), expected, atol=0, rtol=0)
    assert n_trainable(fresh) == n_trainable(model)


def test_load_errors(tmp_path):
    spec = BottleneckSpec(placement="houlsby")
    model = add_bottleneck_adapters(tiny_bert(), spec)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_bottleneck(tiny_bert(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="differs from the model's adapters"):
        save_bottleneck(model, tmp_path / "x", BottleneckSpec(), "tiny")

    ckpt = tmp_path / "ckpt"
    save_bottleneck(model, ckpt, spec, "tiny")
    (ckpt / WEIGHTS_NAME).rename(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_bottleneck(tiny_bert(), ckpt)

    weights = load_file(str(tmp_path / "w.safetensors"))
    dropped = "bert.encoder.layer.1.attention.output.adapter_attn.up.weight"
    save_file({k: v for k, v in weights.items() if k != dropped}, str(ckpt / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"lacks 1 adapter weight.*layer\.1\.attention"):
        load_bottleneck(tiny_bert(), ckpt)

    # pfeiffer-like file loaded as houlsby: 2 attention adapters x 4 tensors missing
    cfg = json.loads((ckpt / CONFIG_NAME).read_text())
    save_file({k: v for k, v in weights.items() if "adapter_attn" not in k},
              str(ckpt / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="lacks 8 adapter weight"):
        load_bottleneck(tiny_bert(), ckpt)

    # the model has a head (classifier) the checkpoint lacks
    save_file({k: v for k, v in weights.items() if "classifier" not in k}, str(ckpt / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"lacks head weight.*classifier\.bias.*load_head=False"):
        load_bottleneck(tiny_bert(), ckpt)
    assert len(bottleneck_modules(load_bottleneck(tiny_bert(), ckpt, load_head=False))) == 4

    # base weights smuggled into an adapter file are refused
    save_file({**weights, "bert.pooler.dense.bias": torch.zeros(HIDDEN)}, str(ckpt / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"neither adapter nor head weights: bert\.pooler\.dense"):
        load_bottleneck(tiny_bert(), ckpt)

    # adapters for a GPT-2 into BERT: nothing lines up
    with pytest.raises(ValueError, match="lacks"):
        gpt = add_bottleneck_adapters(tiny_gpt2(), spec)
        save_bottleneck(gpt, tmp_path / "gpt", spec, "tiny-gpt2")
        load_bottleneck(tiny_bert(), tmp_path / "gpt")

    cfg["format"] = "something-else"
    (ckpt / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a deltakd bottleneck config"):
        read_bottleneck_config(ckpt)


def test_frozen_head_round_trip(tmp_path):
    spec = BottleneckSpec()
    model = add_bottleneck_adapters(tiny_bert(), spec, trainable_extra=())
    assert n_trainable(model) == LAYERS * PER_ADAPTER  # head frozen too
    save_bottleneck(model, tmp_path, spec, "tiny")
    assert read_bottleneck_config(tmp_path)[1]["trainable_extra"] == []
    fresh = load_bottleneck(tiny_bert(), tmp_path)
    assert n_trainable(fresh) == LAYERS * PER_ADAPTER
    torch.testing.assert_close(logits(fresh, "bert"), logits(model, "bert"), atol=0, rtol=0)


def test_load_head_shape_mismatch_and_load_head_false(tmp_path):
    spec = BottleneckSpec()
    model = add_bottleneck_adapters(tiny_bert(), spec)
    save_bottleneck(model, tmp_path, spec, "tiny")
    torch.manual_seed(0)
    cfg3 = BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                      intermediate_size=64, vocab_size=100, num_labels=3)
    mismatch = (r"classifier\.bias has shape \(2,\).*"
                r"classifier\.weight has shape \(2, 32\), the model expects \(3, 32\)"
                r".*load_head=False")
    untouched = BertForSequenceClassification(cfg3)
    with pytest.raises(ValueError, match=mismatch):
        load_bottleneck(untouched, tmp_path)
    assert not bottleneck_modules(untouched)  # a failed load leaves the model as it was
    assert all(p.requires_grad for p in untouched.parameters())
    other = BertForSequenceClassification(cfg3)
    head = other.classifier.weight.detach().clone()
    load_bottleneck(other, tmp_path, load_head=False)
    assert torch.equal(other.classifier.weight, head)
    for n, a in bottleneck_modules(other).items():
        assert torch.equal(a.up.weight, model.get_submodule(n).up.weight), n
    assert other.classifier.weight.requires_grad
