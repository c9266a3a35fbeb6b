"""LoRA-feature distillation: the feature MSE by hand, and capturing lora_A outputs of a real peft model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltakd.losses import lora as L


def test_lora_feature_mse_by_hand():
    s = [torch.ones(1, 2, 3), torch.full((1, 2, 3), 2.0)]
    tt = [torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)]
    assert L.lora_feature_mse(s, tt).item() == pytest.approx((1.0 + 4.0) / 2)
    s_masked = [torch.tensor([[[1.0] * 3, [9.0] * 3]])]
    masked = L.lora_feature_mse(s_masked, [torch.zeros(1, 2, 3)], mask=torch.tensor([[1, 0]]))
    assert masked.item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        L.lora_feature_mse(s, tt[:1])


@pytest.fixture(scope="module")
def tiny_lora_bert():
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    model = get_peft_model(BertModel(config), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value"]))
    # peft initialises lora_B to zero; lora_A is random, which is what we capture.
    model.eval()
    return model


def test_capture_lora_a_outputs_order_shapes_values(tiny_lora_bert):
    model = tiny_lora_bert
    ids = torch.randint(0, 100, (2, 5))
    with L.capture_lora_a_outputs(model) as cap:
        out = model(input_ids=ids, output_hidden_states=True)
    assert len(cap.names) == 6
    suffixes = [n.split("encoder.layer.")[1] for n in cap.names]
    assert suffixes == [
        f"{i}.attention.self.{m}.lora_A.default" for i in range(2) for m in ("query", "key", "value")
    ]
    feats = cap.features()
    assert [f.shape for f in feats] == [torch.Size([2, 5, 4])] * 6
    # layer-0 query lora_A sees the embeddings output (dropout is off in eval mode)
    layer0_query = model.base_model.model.encoder.layer[0].attention.self.query
    expected = layer0_query.lora_A["default"](out.hidden_states[0])
    torch.testing.assert_close(feats[0], expected)
    assert sorted(cap.by_layer()) == [0, 1] and len(cap.by_layer()[1]) == 3
    # hooks are removed on exit
    model(input_ids=ids)
    assert len(cap.features()) == 6


def test_capture_lora_a_outputs_filter_gradients_and_errors(tiny_lora_bert):
    model = tiny_lora_bert
    ids = torch.randint(0, 100, (2, 5))
    with L.capture_lora_a_outputs(model, module_names_filter=("value",)) as cap:
        model(input_ids=ids)
    assert len(cap.names) == 2 and all(".value." in n for n in cap.names)
    feats = cap.features()
    teacher = [f.detach() + 1.0 for f in feats]
    model.zero_grad()
    L.lora_feature_mse(feats, teacher).backward()
    weight = model.base_model.model.encoder.layer[1].attention.self.value.lora_A["default"].weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    model.zero_grad()
    with pytest.raises(ValueError, match="no LoRA lora_A modules"):
        with L.capture_lora_a_outputs(nn.Linear(2, 2)):
            pass
    with pytest.raises(ValueError, match="no LoRA lora_A modules"):
        with L.capture_lora_a_outputs(model, adapter_name="other"):
            pass


def test_lora_features_between_two_models_zero_when_equal(tiny_lora_bert):
    ids = torch.randint(0, 100, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        with L.capture_lora_a_outputs(tiny_lora_bert) as cap_t:
            tiny_lora_bert(input_ids=ids, attention_mask=mask)
        with L.capture_lora_a_outputs(tiny_lora_bert) as cap_s:
            tiny_lora_bert(input_ids=ids, attention_mask=mask)
    assert L.lora_feature_mse(cap_s.features(), cap_t.features(), mask=mask).item() == pytest.approx(0.0, abs=1e-10)
