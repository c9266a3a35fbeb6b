"""The multistage family under two processes (gloo, CPU): in-batch negatives gathered across
processes (the 2-process contrastive loss and gradient equal the 1-process ones on the same global
batch), the main process first for what is built once, and a torchrun stage."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from deltakd.multistage.losses import loss_terms
from deltakd.multistage.processes import (
    gather_rows,
    main_process_first,
    mean_over_processes,
    world,
)
from deltakd.multistage.recipe import LossConfig

from ..conftest import ROOT

GLOBAL_BATCH = 8
CFG = LossConfig(mse=1.0, mcl=1.0, ce=0.5, bool=0.25, temperature=0.05, bool_bias=-1.0)
EVEN = [(0, 4), (4, 8)]  # rows of each process
UNEVEN = [(0, 5), (5, 8)]


def _loss_and_grads(rows: tuple[int, int], gather=None, dtype=torch.float64) -> dict:
    """A linear "encoder" (6 -> 5) on this process's rows of a fixed global batch: the loss terms,
    the weighted loss, and the parameter gradients averaged over processes (as DDP does). Float64:
    the comparison measures the method, not float32 rounding (``dtype``: float32 for the figures)."""
    torch.manual_seed(0)
    enc = nn.Linear(6, 5).to(dtype)
    g = torch.Generator().manual_seed(1)
    x_en, x_tr = torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 6, generator=g)
    t_en = torch.randn(GLOBAL_BATCH, 5, generator=g)  # the teacher's English embeddings: no gradient
    x_en, x_tr, t_en = x_en.to(dtype), x_tr.to(dtype), t_en.to(dtype)
    lo, hi = rows
    terms = loss_terms(enc(x_en[lo:hi]), enc(x_tr[lo:hi]), t_en[lo:hi], CFG, gather=gather)
    weights = CFG.weights()
    loss = sum(weights[k] * v for k, v in terms.items())
    loss.backward()
    _, size = world()
    grads = []
    for p in enc.parameters():
        if size > 1:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= size
        grads.append(p.grad.flatten().tolist())
    return {"terms": {k: float(v.detach()) for k, v in terms.items()}, "loss": float(loss.detach()), "grads": grads,
            "logged_mse": float(mean_over_processes(terms["mse"]))}


def _worker(rank: int, size: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        result = {
            "gathered": _loss_and_grads(EVEN[rank], gather=gather_rows),
            "local": _loss_and_grads(EVEN[rank]),  # without gathering: each process's own negatives
            "uneven": _loss_and_grads(UNEVEN[rank], gather=gather_rows),
            "float32": _loss_and_grads(EVEN[rank], gather=gather_rows, dtype=torch.float32),
        }
        marker = Path(out) / "built"
        with main_process_first():
            if rank == 0:
                time.sleep(0.5)  # a slow build: the other process must wait for it
                marker.write_text("rank 0")
            result["saw_build"] = marker.is_file()
        (Path(out) / f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("two-processes")
    mp.spawn(_worker, args=(2, str(out / "rendezvous"), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow  # two spawned gloo processes: ~30 s, and one spawn aborted (SIGABRT) in a full-suite run
def test_two_process_contrastive_loss_and_gradient_equal_one_process_on_the_same_global_batch(two_processes):
    one = _loss_and_grads((0, GLOBAL_BATCH))  # one process, the whole batch, no process group
    for rank, res in enumerate(two_processes):
        got = res["gathered"]
        for term in ("mcl", "ce", "bool"):  # every process computes the global batch's value
            assert got["terms"][term] == pytest.approx(one["terms"][term], abs=1e-6), (rank, term)
        # the MSE is per process; its mean over processes (what is logged) is the global one
        assert got["logged_mse"] == pytest.approx(one["terms"]["mse"], abs=1e-6)
        # after DDP's averaging, the gradient of the whole loss is the one-process gradient
        for g2, g1 in zip(got["grads"], one["grads"]):
            assert torch.allclose(torch.tensor(g2), torch.tensor(g1), atol=1e-6, rtol=0)
    mean_loss = sum(r["gathered"]["loss"] for r in two_processes) / 2
    assert mean_loss == pytest.approx(one["loss"], abs=1e-6)
    # processes holding different numbers of rows: the contrastive terms are still the global ones
    for res in two_processes:
        for term in ("mcl", "ce", "bool"):
            assert res["uneven"]["terms"][term] == pytest.approx(one["terms"][term], abs=1e-6)
    # float32 (as trained): equal up to rounding
    one32 = _loss_and_grads((0, GLOBAL_BATCH), dtype=torch.float32)
    for res in two_processes:
        for term in ("mcl", "ce", "bool"):
            assert res["float32"]["terms"][term] == pytest.approx(one32["terms"][term], abs=1e-5)
        for g2, g1 in zip(res["float32"]["grads"], one32["grads"]):
            assert torch.allclose(torch.tensor(g2), torch.tensor(g1), atol=1e-5, rtol=1e-6)
    # without gathering, each process sees only its own negatives: the loss is another one
    local = [r["local"]["terms"]["mcl"] for r in two_processes]
    assert abs(sum(local) / 2 - one["terms"]["mcl"]) > 1e-2


@pytest.mark.slow  # two spawned gloo processes: ~30 s, and one spawn aborted (SIGABRT) in a full-suite run
def test_main_process_builds_first_and_the_others_read_after(two_processes):
    assert [r["saw_build"] for r in two_processes] == [True, True]


def test_one_process_is_unchanged():
    x = torch.randn(3, 4, requires_grad=True)
    assert world() == (0, 1) and gather_rows(x) is x
    with main_process_first():
        pass
    assert float(mean_over_processes(torch.tensor(2.5))) == 2.5


def _stage_recipe(path: Path, teacher: Path, world_files: dict[str, Path], batch_size: int, runs: Path) -> Path:
    path.write_text(
        "family: multistage\nname: mcl2\n"
        f"teacher: {{model: {teacher}}}\n"
        f"data: {{train: [{world_files['de']}, {world_files['fr']}], heldout: 4, max_length: 16}}\n"
        "eval: {speed_sentences: 8}\n"
        "loss: {mse: 1.0, mcl: 1.0, temperature: 0.05}\n"
        f"train: {{max_steps: 3, batch_size: {batch_size}, lr: 1.0e-3, logging_steps: 1, warmup_ratio: 0.0}}\n"
        f"output_dir: {runs}\n", encoding="utf-8")
    return path


def _step_logs(run: Path) -> list[dict]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if "loss" in e and "eval_loss" not in e and "train_runtime" not in e]


@pytest.mark.slow
def test_torchrun_stage_with_contrastive_loss_matches_one_process_step_by_step(tmp_path, minilm_path):
    """A stage with MSE + MCL under torchrun (2 gloo processes, 4 pairs each) logs, step by step, the
    loss of one process with 8 pairs: the same global batches (the sampler shards one shuffled
    order), the in-batch negatives gathered, the gradients averaged. Dropout off, so the student is
    a function of its weights."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    from deltakd import pipeline as msrun

    from .test_run import ADJ, NOUN, PLACE, VERB, sentence

    combos = list(itertools.product(ADJ, NOUN, VERB, PLACE))
    random.Random(0).shuffle(combos)
    files = {}
    for lang, idx in (("de", 0), ("fr", 1)):
        files[lang] = tmp_path / f"train.en-{lang}.tsv"
        part = combos[:24] if lang == "de" else combos[24:48]
        files[lang].write_text("".join(f"{sentence(c, None)}\t{sentence(c, idx)}\n" for c in part), encoding="utf-8")
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(teacher)
    tok.save_pretrained(teacher)

    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DELTAKD_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    two = _stage_recipe(tmp_path / "two.yaml", teacher, files, 4, tmp_path / "runs2")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "deltakd.cli", "train", str(two)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "runs2" / "mcl2").iterdir())
    assert len(runs) == 1, "both processes share one run directory"
    results = json.loads((runs[0] / "results.json").read_text())
    assert results["train_steps"] == 3 and results["tested"] is True
    assert len(list((cache / "multistage-teacher").iterdir())) == 1  # the teacher cache, built once
    st = SentenceTransformer(str(runs[0] / "model"), device="cpu")
    assert st.encode(["the red cat sleeps outside"], convert_to_tensor=True).shape == (1, 32)

    one = _stage_recipe(tmp_path / "one.yaml", teacher, files, 8, tmp_path / "runs1")
    [outcome] = msrun.run_pipeline([one])
    logs1, logs2 = _step_logs(outcome.run_dir), _step_logs(runs[0])
    assert [e["step"] for e in logs2] == [e["step"] for e in logs1] == [1, 2, 3]
    for a, b in zip(logs1, logs2):
        for key in ("loss", "loss_mse", "loss_mcl"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key, a[key], b[key])
