"""Model loading: a model whose own Python code will run is named in one warning line."""

from __future__ import annotations

import logging

from deltakd.models import hub
from deltakd.models.delta import Head, load_base, load_tokenizer
from deltakd.recipe.schema import ModelConfig


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "deltakd.models.hub"]


def test_trust_remote_code_warns_once_naming_the_model(tiny_bert, caplog, monkeypatch):
    monkeypatch.setattr(hub, "_REMOTE_CODE_WARNED", set())
    cfg = ModelConfig(name=str(tiny_bert), trust_remote_code=True)
    with caplog.at_level(logging.WARNING, logger="deltakd.models.hub"):
        load_tokenizer(cfg)
        load_base(cfg, Head(2, ("0", "1")))
    expected = f"model '{tiny_bert}': trust_remote_code is on: Python code shipped with the model runs on this machine"
    assert _warnings(caplog) == [expected]


def test_no_warning_without_remote_code(tiny_bert, caplog, monkeypatch):
    monkeypatch.setattr(hub, "_REMOTE_CODE_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="deltakd.models.hub"):
        load_tokenizer(ModelConfig(name=str(tiny_bert)))
        hub.load_pretrained(lambda path, **kw: path, "some/model", trust_remote_code=False)
    assert _warnings(caplog) == []
