"""KD job, deltakd vs the plain PyTorch loop: samples/s, dev accuracy, eval speed, share of matmul peak.

The job (issue 19): teacher all-MiniLM-L6-v2 fully fine-tuned on SST-2 (one epoch, lr 5e-5,
deltakd's recipe, trained once and shared); student: its embeddings, layers 0, 2, 4, pooler and
classifier copied (as deltakd's ``student.from_teacher`` does); loss 0.5 CE + 0.5 T^2 KL (T=2)
+ hidden-state MSE between student layer i and teacher layer 2i (mean over the three pairs, each
over unmasked tokens); AdamW lr 5e-5 constant, no weight decay (deltakd's default), gradient norm
clipped at 1 (as the Trainer does); batch 32, max length 64; one epoch over the first
``--samples`` SST-2 training sentences (/work/shared/data GLUE SST-2, else the shipped sample);
accuracy on the SST-2 dev set (872 sentences).

- plain: the loop written by hand: random batch order, each batch padded to its longest sentence,
  the teacher run live every step, ``torch.optim.AdamW``, evaluation in batches of 32 in file order.
- deltakd: the same job as a recipe through the whole run lifecycle (``deltakd train``) with its
  defaults (length-grouped batches, fused AdamW, teacher cache where the losses allow it, ...).

The two run interleaved in one process, ``--rounds`` times (the order alternates). Training
samples/s: from the start of training to the last optimizer step (the per-epoch evaluation and
checkpoint saving of deltakd are left out; so is the plain loop's evaluation). Also printed: each
command's whole wall time, evaluation samples/s vs training samples/s of the same model, the
machine's fp32 matmul peak (a large sgemm timed in this process, same threads) and the share of
it the student's forward + backward reaches (FLOPs estimated from the config and the real tokens).

    python benchmarks/kd_vs_plain.py [--samples 8000] [--rounds 3] [--threads 2] [--bf16] [--json out.json]
    python benchmarks/kd_vs_plain.py --smoke        # CI: a few dozen sentences, one round
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
GLUE = Path("/work/shared/data/glue/sst2")
LAYERS = (0, 2, 4)
T = 2.0


# --- data ------------------------------------------------------------------------------------------


def write_data(folder: Path, samples: int, dev: int | None) -> Path:
    """train.tsv (the first ``samples`` training sentences) and dev.tsv (all, or the first ``dev``)."""
    src = GLUE if (GLUE / "train.tsv").is_file() else ROOT / "data/sst2"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", samples), ("dev.tsv", dev)):
        lines = (src / name).read_text().splitlines()
        rows = lines[1:] if n is None else lines[1:n + 1]
        (folder / name).write_text("\n".join([lines[0], *rows]) + "\n")
    return folder


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return [r[0] for r in rows], [int(r[1]) for r in rows]


# --- FLOPs and the machine's peak ------------------------------------------------------------------


def forward_flops_per_token(config, tokens: float) -> float:
    """Forward FLOPs per token of a BERT encoder (matmuls only): per layer 2 * (4 H^2 + 2 H I) for the
    projections and feed-forward, plus 4 * L * H for the attention scores and their weighted sum,
    at sequence length ``tokens``."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return n * (2 * (4 * h * h + 2 * h * i) + 4 * tokens * h)


def student_step_flops(config, mean_tokens: float) -> float:
    """FLOPs of the student's forward + backward per sample (backward = 2x forward)."""
    return 3 * forward_flops_per_token(config, mean_tokens) * mean_tokens


def matmul_peak(size: int, repeats: int = 5) -> float:
    """The fp32 matmul rate of this process (FLOP/s): the best of ``repeats`` size x size sgemms."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


# --- the teacher (trained once, by deltakd's recipe) ------------------------------------------------


def base(data: Path, out: Path, a) -> dict:
    return {"task": {"name": "sst2", "data_dir": str(data), "max_length": a.max_length},
            "track": [], "output_dir": str(out)}


def train_teacher(data: Path, out: Path, a) -> str:
    from deltakd import api
    from deltakd.recipe import validate

    res = api.train(validate({**base(data, out, a), "name": "teacher", "model": {"name": a.model},
                              "peft": {"method": "full"},
                              "train": {"epochs": 1, "lr": 5e-5, "batch_size": a.batch_size, "seed": a.seed,
                                        "logging_steps": 50, "save_optimizer": False}}))
    return res["run_dir"]


# --- deltakd ---------------------------------------------------------------------------------------


class Clock:
    """Training start and the end of each optimizer step (a Trainer callback)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self
        self.begin: float | None = None
        self.steps: list[float] = []

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                clock.steps.append(time.perf_counter())

        self.callback = _CB()


def student_recipe(teacher_dir: str, data: Path, out: Path, a) -> dict:
    return {**base(data, out, a), "name": "student", "teacher": {"run": teacher_dir},
            "student": {"from_teacher": {"layers": list(LAYERS)}}, "peft": {"method": "full"},
            "distill": {"losses": {"ce": 0.5, "kd": 0.5, "hidden_mse": 1.0}, "temperature": T,
                        "layer_map": {i: t for i, t in enumerate(LAYERS)}},
            "train": {"epochs": 1, "lr": 5e-5, "scheduler": "constant", "batch_size": a.batch_size,
                      "seed": a.seed, "logging_steps": 50,
                      "save_optimizer": False, "bf16": a.bf16, **a.train_overrides}}  # else deltakd's defaults


def run_deltakd(recipe_data: dict) -> dict:
    """One ``deltakd train`` of the recipe (the whole lifecycle), with a step clock attached."""
    from deltakd import families
    from deltakd.recipe import validate
    from deltakd.runner.lifecycle import run

    t0 = time.perf_counter()
    recipe = validate(recipe_data)
    fam = families.family_of(recipe)
    clock = Clock()
    make = fam.make_trainer
    fam.make_trainer = lambda prep, args, cbs: make(prep, args, [*cbs, clock.callback])
    res = run(recipe, fam)
    wall = time.perf_counter() - t0
    n = res.examples["train"]
    train_s = clock.steps[-1] - clock.begin
    return {"train_sps": n / train_s, "train_s": train_s, "wall_s": wall,
            "accuracy": res.metrics["valid"]["accuracy"],
            "eval_sps": res.extra["eval_samples_per_second"], "steps": res.train_steps}


# --- the plain loop --------------------------------------------------------------------------------


def plain_student(teacher: torch.nn.Module) -> torch.nn.Module:
    """The teacher's copy with layers 0, 2, 4 (embeddings, pooler and classifier copied)."""
    import copy

    student = copy.deepcopy(teacher)
    student.bert.encoder.layer = torch.nn.ModuleList(student.bert.encoder.layer[i] for i in LAYERS)
    student.config.num_hidden_layers = len(LAYERS)
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train()


def batches(ids: list[list[int]], labels: list[int], order: list[int], size: int, pad: int):
    """Batches in ``order``, each padded to its longest sentence: (input_ids, attention_mask, labels)."""
    for s in range(0, len(order), size):
        idx = order[s:s + size]
        longest = max(len(ids[i]) for i in idx)
        x = torch.full((len(idx), longest), pad, dtype=torch.long)
        m = torch.zeros((len(idx), longest), dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, :len(ids[i])] = torch.tensor(ids[i])
            m[r, :len(ids[i])] = 1
        yield x, m, torch.tensor([labels[i] for i in idx])


def masked_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per_token = (s - t).pow(2).mean(-1)  # (B, L)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum()


def run_plain(teacher_dir: str, data: Path, a) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltakd.models.delta import find_model_dir

    t0 = time.perf_counter()
    model_dir = find_model_dir(teacher_dir)
    if (model_dir / "merged" / "config.json").is_file():  # a LoRA teacher's merged copy: what deltakd's trainer runs
        model_dir = model_dir / "merged"
    tok = AutoTokenizer.from_pretrained(model_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(a.seed)
    student = plain_student(teacher)
    texts, labels = read_tsv(data / "train.tsv")
    ids = tok(texts, truncation=True, max_length=a.max_length)["input_ids"]
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.0)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(a.seed)).tolist()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16)
    start = time.perf_counter()
    for x, m, y in batches(ids, labels, order, a.batch_size, tok.pad_token_id):
        with autocast:
            with torch.no_grad():
                t = teacher(input_ids=x, attention_mask=m, output_hidden_states=True)
            s = student(input_ids=x, attention_mask=m, output_hidden_states=True)
            ce = F.cross_entropy(s.logits, y)
            kd = F.kl_div(F.log_softmax(s.logits / T, -1), F.log_softmax(t.logits / T, -1),
                          reduction="batchmean", log_target=True) * T * T
            hid = torch.stack([masked_mse(s.hidden_states[i + 1], t.hidden_states[j + 1], m)
                               for i, j in enumerate(LAYERS)]).mean()
            loss = 0.5 * ce + 0.5 * kd + hid
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    train_s = time.perf_counter() - start
    dev_texts, dev_labels = read_tsv(data / "dev.tsv")
    dev_ids = tok(dev_texts, truncation=True, max_length=a.max_length)["input_ids"]
    student.eval()
    correct = 0
    e0 = time.perf_counter()
    with torch.no_grad(), autocast:
        for x, m, y in batches(dev_ids, dev_labels, list(range(len(dev_ids))), 32, tok.pad_token_id):
            correct += int((student(input_ids=x, attention_mask=m).logits.argmax(-1) == y).sum())
    eval_s = time.perf_counter() - e0
    return {"train_sps": len(ids) / train_s, "train_s": train_s, "wall_s": time.perf_counter() - t0,
            "accuracy": correct / len(dev_ids), "eval_sps": len(dev_ids) / eval_s,
            "mean_tokens": sum(map(len, ids)) / len(ids), "config": student.config}


# --- main ------------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8000, help="training sentences (the first N of SST-2 train)")
    ap.add_argument("--dev", type=int, default=None, help="dev sentences (default all 872)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--model", default="minilm-l6", help="the teacher's base model (name or path)")
    ap.add_argument("--teacher", default=None, help="a finished deltakd run to use as the teacher (a LoRA run: its "
                    "merged copy) instead of fine-tuning one here (the machine is slow, or to share one)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast in both (deltakd: train.bf16)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a train.* key of deltakd's recipe, e.g. --set group_by_length=false (JSON values)")
    ap.add_argument("--sgemm", type=int, default=2048, help="matrix size of the peak measurement")
    ap.add_argument("--smoke", action="store_true", help="CI: 48 sentences, 32 dev, one round, small sgemm")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    a = ap.parse_args(argv)
    if a.smoke:
        a.samples, a.dev, a.rounds, a.sgemm, a.batch_size = min(a.samples, 48), 32, 1, 256, 16
    a.train_overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("DELTAKD_CACHE", str(tmp / "cache"))
        data = write_data(tmp / "sst2", a.samples, a.dev)
        t0 = time.perf_counter()
        teacher_dir = a.teacher or train_teacher(data, tmp / "runs", a)
        print(f"teacher: {teacher_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)
        recipe = student_recipe(teacher_dir, data, tmp / "runs", a)
        rounds: dict[str, list[dict]] = {"deltakd": [], "plain": []}
        peaks = [matmul_peak(a.sgemm)]
        for r in range(a.rounds):  # interleaved, the order alternating: drift in machine speed hits both
            for who in (("deltakd", "plain") if r % 2 == 0 else ("plain", "deltakd")):
                rounds[who].append(run_deltakd(recipe) if who == "deltakd" else run_plain(teacher_dir, data, a))
            peaks.append(matmul_peak(a.sgemm))  # after each round: the machine's speed drifts (shared CPUs)
            print(f"round {r + 1}: " + "   ".join(
                f"{w} {v[-1]['train_sps']:.1f} samples/s (acc {v[-1]['accuracy']:.4f}, eval {v[-1]['eval_sps']:.1f}/s, "
                f"wall {v[-1]['wall_s']:.0f} s)" for w, v in rounds.items()), flush=True)
        peak = max(peaks)  # the best the machine gave this process: the share is a lower bound under load
    med = {w: {k: statistics.median(x[k] for x in v) for k in ("train_sps", "accuracy", "eval_sps", "wall_s")}
           for w, v in rounds.items()}
    plain0 = rounds["plain"][0]
    flops = student_step_flops(plain0["config"], plain0["mean_tokens"])
    teacher_fwd = forward_flops_per_token(plain0["config"], plain0["mean_tokens"]) * plain0["mean_tokens"] * 2
    share = {w: med[w]["train_sps"] * flops / peak for w in med}
    share_all = {w: med[w]["train_sps"] * (flops + teacher_fwd) / peak for w in med}
    out = {"samples": a.samples, "teacher": a.teacher or "fine-tuned here", "rounds": a.rounds, "threads": torch.get_num_threads(), "bf16": a.bf16,
           "set": a.train_overrides, "median": med, "ratio": med["deltakd"]["train_sps"] / med["plain"]["train_sps"],
           "wall_ratio": med["plain"]["wall_s"] / med["deltakd"]["wall_s"],
           "eval_over_train": {w: med[w]["eval_sps"] / med[w]["train_sps"] for w in med},
           "peak_gflops": peak / 1e9, "peaks_gflops": [p / 1e9 for p in peaks], "student_flops_per_sample": flops, "mean_tokens": plain0["mean_tokens"],
           "student_share_of_peak": share, "step_share_of_peak_with_teacher": share_all,
           "rounds_raw": {w: [{k: v for k, v in x.items() if k != "config"} for x in v] for w, v in rounds.items()},
           "load": os.getloadavg()}
    print(f"\n{a.samples} sentences, {a.rounds} rounds (medians), {out['threads']} threads, "
          f"{'bf16 autocast' if a.bf16 else 'fp32'}, load {out['load'][0]:.2f}; deltakd train.* {a.train_overrides or '{}'}")
    print("| | train samples/s | dev accuracy | eval samples/s | eval / train | wall s | student share of peak |")
    print("|---|---|---|---|---|---|---|")
    for w in ("plain", "deltakd"):
        m = med[w]
        print(f"| {w} | {m['train_sps']:.1f} | {m['accuracy']:.4f} | {m['eval_sps']:.1f} | "
              f"{out['eval_over_train'][w]:.2f}x | {m['wall_s']:.0f} | {100 * share[w]:.1f}% "
              f"({100 * share_all[w]:.1f}% with the teacher forward) |")
    print(f"ratio deltakd / plain (training samples/s) = {out['ratio']:.3f}  (goal >= 1.5); whole command, wall time plain / deltakd = "
          f"{out['wall_ratio']:.3f}")
    print(f"fp32 matmul peak ({a.sgemm}^3 sgemm, best of {len(peaks)} measurements: "
          f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)}): {out['peak_gflops']:.1f} GFLOP/s; student fwd+bwd "
          f"{flops / 1e9:.2f} GFLOP/sample at {plain0['mean_tokens']:.1f} real tokens")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
