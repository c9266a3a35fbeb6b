"""benchmarks/kd_vs_plain.py --smoke: both loops run the KD job end to end and the figures add up."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from .conftest import ROOT, write_tiny_bert


def _bench():
    spec = importlib.util.spec_from_file_location("bench_kd_vs_plain", ROOT / "benchmarks" / "kd_vs_plain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_student_flops_follow_the_config():
    bench = _bench()
    cfg = type("C", (), {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 3})()
    per_token = 3 * (2 * (4 * 384 * 384 + 2 * 384 * 1536) + 4 * 10 * 384)  # 3 layers at 10 tokens
    assert bench.forward_flops_per_token(cfg, 10) == per_token
    assert bench.student_step_flops(cfg, 10) == 3 * per_token * 10  # forward + backward (2x) per sample


def test_plain_student_keeps_teacher_layers_0_2_4(tmp_path, minilm_path):
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(
        write_tiny_bert(tmp_path / "t", minilm_path, layers=6), num_labels=2)
    student = _bench().plain_student(teacher)
    assert len(student.bert.encoder.layer) == 3 and student.config.num_hidden_layers == 3
    for i, j in enumerate((0, 2, 4)):
        assert torch.equal(student.bert.encoder.layer[i].output.dense.weight, teacher.bert.encoder.layer[j].output.dense.weight)
    assert student.bert.encoder.layer[1].output.dense.weight.data_ptr() != teacher.bert.encoder.layer[2].output.dense.weight.data_ptr()
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert all(p.requires_grad for p in student.parameters())


def test_smoke_runs_both_loops_and_reports(tmp_path, minilm_path, capsys):
    tiny = write_tiny_bert(tmp_path / "tiny", minilm_path, layers=6)
    out_file = tmp_path / "out.json"
    out = _bench().main(["--smoke", "--model", str(tiny), "--threads", "1", "--json", str(out_file)])
    assert json.loads(out_file.read_text())["ratio"] == pytest.approx(out["ratio"])
    raw = out["rounds_raw"]
    assert len(raw["deltakd"]) == len(raw["plain"]) == 1
    assert raw["deltakd"][0]["steps"] == 3  # 48 sentences in batches of 16, one epoch
    for who in ("deltakd", "plain"):
        m = out["median"][who]
        assert m["train_sps"] > 0 and m["eval_sps"] > 0 and 0 <= m["accuracy"] <= 1
        assert m["accuracy"] * 32 == pytest.approx(round(m["accuracy"] * 32))  # a share of the 32 dev sentences
    assert out["ratio"] == pytest.approx(out["median"]["deltakd"]["train_sps"] / out["median"]["plain"]["train_sps"])
    assert out["peak_gflops"] == max(out["peaks_gflops"]) > 0
    assert 0 < out["student_share_of_peak"]["plain"] < out["step_share_of_peak_with_teacher"]["plain"]
    printed = capsys.readouterr().out
    assert "| plain |" in printed and "| deltakd |" in printed and "ratio deltakd / plain" in printed
