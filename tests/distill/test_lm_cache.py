"""The sparse causal-LM teacher cache: packing, the stored top-k, its key, and runs that read it."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from deltakd import api
from deltakd.distill import lm_cache
from deltakd.losses import lm as L

from ..conftest import write_recipe
from ..test_partial_kd import _base, _text


@pytest.mark.parametrize("width", [300, 50257, 65536, 128256])
def test_ids_pack_and_unpack(width):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, width, size=(3, 5, 7))
    ids[0, 0, 0] = width - 1
    packed = lm_cache.pack_ids(ids, width)
    assert packed.dtype == (np.uint16 if width <= 65536 else np.uint8)
    assert packed.nbytes == ids.size * (2 if width <= 65536 else 3)
    assert np.array_equal(lm_cache.unpack_ids(packed), ids)
    assert lm_cache.bytes_per_token(64, width) == (258 if width <= 65536 else 322)


def _tiny_gpt2(vocab: int = 97):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=vocab, n_positions=16)).eval()


class _Tok:  # what tokenizer_fingerprint reads of a slow tokenizer
    model_max_length, padding_side = 16, "right"

    def get_vocab(self):
        return {f"t{i}": i for i in range(97)}


def test_entry_holds_the_teacher_top_k_and_is_reused(tmp_path, monkeypatch):
    teacher = _tiny_gpt2()
    blocks = datasets.Dataset.from_dict({"input_ids": np.random.default_rng(1).integers(0, 97, (6, 8))})
    cache = lm_cache.load_or_build(teacher, blocks, _Tok(), 8, 2.0, 97, batch_size=4, root=tmp_path)
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["bytes_per_token"] == cache.bytes_per_token == 8 * 4 + 2 and meta["tokens"] == 48
    stored = sum((cache.path / f).stat().st_size for f in ("ids.npy", "logp.npy", "tail.npy"))
    assert stored - 3 * 128 <= 48 * cache.bytes_per_token  # npy headers aside, what the meta says
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor(blocks["input_ids"])).logits  # (6, 8, 97)
    logp = torch.log_softmax(logits / 2.0, -1)
    got = cache.lookup(torch.tensor([4, 1]))
    assert got.ids.shape == (2, 8, 8) and got.ids.dtype == torch.int64 and got.width == 97
    want_lp, want_ids = logp[[4, 1]].topk(8, -1)
    assert torch.equal(got.ids, want_ids)
    torch.testing.assert_close(got.logp, want_lp, atol=2e-2, rtol=1e-3)  # float16
    torch.testing.assert_close(got.tail.exp(), 1 - want_lp.exp().sum(-1), atol=2e-3, rtol=1e-2)
    # same teacher, data, k, T: the entry is read, nothing built
    monkeypatch.setattr(lm_cache, "build_entry", lambda *a, **k: pytest.fail("rebuilt"))
    assert lm_cache.load_or_build(teacher, blocks, _Tok(), 8, 2.0, 97, batch_size=4, root=tmp_path).path == cache.path
    monkeypatch.undo()
    # another temperature, k, or data is another entry
    other = [lm_cache.load_or_build(teacher, blocks, _Tok(), 8, 1.0, 97, 4, root=tmp_path).path,
             lm_cache.load_or_build(teacher, blocks, _Tok(), 4, 2.0, 97, 4, root=tmp_path).path,
             lm_cache.load_or_build(teacher, blocks.select(range(5)), _Tok(), 8, 2.0, 97, 4, root=tmp_path).path]
    assert len({cache.path, *other}) == 4


def test_full_k_cache_serves_the_dense_loss(tmp_path):
    """k = V: the cached sparse KL of a student equals the dense KL against the live teacher (float16 aside)."""
    from deltakd.losses import lm_sparse

    teacher, student = _tiny_gpt2(), _tiny_gpt2()
    torch.manual_seed(5)
    for p in student.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    blocks = datasets.Dataset.from_dict({"input_ids": np.random.default_rng(2).integers(0, 97, (4, 8))})
    cache = lm_cache.load_or_build(teacher, blocks, _Tok(), 500, 1.0, 97, batch_size=4, root=tmp_path)
    assert cache.k == 97  # k capped at the width
    x = torch.tensor(blocks["input_ids"])
    with torch.no_grad():
        dense = L.token_kl(student(input_ids=x).logits, teacher(input_ids=x).logits, 1.0)
        c = cache.lookup(torch.arange(4))
        sparse = lm_sparse.sparse_token_kl(student(input_ids=x).logits, c.ids, c.logp, c.tail, 1.0)
    assert sparse.item() == pytest.approx(dense.item(), rel=2e-3)


def _student_recipe(tmp_path: Path, base: str, name: str, distill: str) -> Path:
    return write_recipe(tmp_path / f"{name}.yaml", base + f"""
name: {name}
teacher: {{run: {tmp_path / 'runs' / 't'}}}
student: {{from_teacher: {{nb_layers: 1}}}}
distill: {distill}
""")


@pytest.mark.slow
def test_cached_runs_never_run_the_teacher_and_reuse_the_entry(tmp_path, monkeypatch):
    data = _text(tmp_path)
    base = _base(tmp_path, data).replace("epochs: 3", "max_steps: 6")
    api.train(write_recipe(tmp_path / "teacher.yaml", base + """
name: t
model: {config: {model_type: gpt2, n_layer: 2, n_embd: 32, n_head: 2, n_positions: 32}, vocab_size: 300}
"""))
    builds = []
    real = lm_cache.build_entry
    monkeypatch.setattr(lm_cache, "build_entry", lambda *a, **k: builds.append(1) or real(*a, **k))
    cached = "{losses: {ce: 0.5, kd: 0.5}, temperature: 1.0, cache_teacher: true, top_k: 300}"
    a = api.train(_student_recipe(tmp_path, base, "a", cached))
    assert builds == [1] and a["distill"]["teacher_forwards"] == 0
    assert a["distill"]["teacher_cache_bytes_per_token"] == 300 * 4 + 2
    b = api.train(_student_recipe(tmp_path, base, "b", cached), ["train.seed=2"])  # another student run
    assert builds == [1] and b["distill"]["teacher_forwards"] == 0  # nothing built: the same entry
    assert b["distill"]["teacher_cache"] == a["distill"]["teacher_cache"]
    live = api.train(_student_recipe(tmp_path, base, "live", "{losses: {ce: 0.5, kd: 0.5}, temperature: 1.0}"))
    assert live["distill"]["teacher_forwards"] == 6 and live["distill"]["teacher_cache"] is None  # lm: opt in
    # k = V: the cached run follows the live dense run (float16 teacher values aside)
    def kd_terms(res):
        rows = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        return [r["loss_kd"] for r in rows if "loss_kd" in r]
    assert kd_terms(a) == pytest.approx(kd_terms(live), rel=1e-2)
    assert a["metrics"]["test"]["loss"] == pytest.approx(live["metrics"]["test"]["loss"], rel=1e-3)
    # hidden-state losses still need the live teacher: it runs, the kd term comes from its logits
    mixed = api.train(_student_recipe(tmp_path, base, "mixed", "{losses: {ce: 0.5, kd: 0.4, hidden_cos: 0.1}, "
                                      "temperature: 1.0, cache_teacher: true, top_k: 16}"))
    assert builds == [1, 1] and mixed["distill"]["teacher_forwards"] == 6
