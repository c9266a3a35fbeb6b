"""Seconds per training step: ``deltakd train`` (HF Trainer) vs a plain hand-written PyTorch loop.

Same model (MiniLM-L6 + LoRA r=8 on query/value), same data, same batch size, same optimiser
(AdamW, linear schedule, gradient clipping). Every sequence is exactly ``--length`` tokens, so
each step costs the same whichever batches the two loops draw. Timing runs from the end of
step ``--warmup`` to the end of the last step: data loading, forward, backward, optimiser and
logging are all inside the window; the final evaluation and saving are not.

    python benchmarks/train_overhead.py [--steps 80] [--rounds 3]

Prints the ratio deltakd / plain (goal <= 1.05).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback, get_linear_schedule_with_warmup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_data(folder: Path, n: int) -> None:
    """Long sentences built from the shipped SST-2 sample (truncated to the same length)."""
    lines = (ROOT / "data/sst2/train.tsv").read_text().splitlines()[1:]
    rows = []
    for i in range(n):
        words = " ".join(lines[(i * 7 + j) % len(lines)].split("\t")[0] for j in range(12))
        rows.append(f"{words}\t{i % 2}")
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def seconds_per_step(times: list[float], warmup: int) -> float:
    return (times[-1] - times[warmup - 1]) / (len(times) - warmup)


def run_deltakd(recipe, warmup: int) -> float:
    from deltakd import families
    from deltakd.runner import training_arguments
    from deltakd.runner.callbacks import MetricsLogCallback
    from deltakd.runs import new_run_dir

    fam = families.family_of(recipe)
    prep = fam.prepare(recipe)
    clock = StepClock()
    run = new_run_dir(recipe.output_dir, recipe.name)
    args = training_arguments(recipe.train, run, [], prep.task.spec.main_metric)
    trainer = fam.make_trainer(prep, args, [MetricsLogCallback(run), clock])
    trainer.train()
    return seconds_per_step(clock.times, warmup)


def run_plain(recipe, warmup: int) -> float:
    from transformers import DataCollatorWithPadding

    from deltakd import families

    prep = families.prepare(recipe)
    t = recipe.train
    model = prep.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, 0, t.max_steps)
    loader = torch.utils.data.DataLoader(prep.datasets["train"], batch_size=t.batch_size, shuffle=True,
                                         collate_fn=DataCollatorWithPadding(prep.tokenizer))
    times: list[float] = []
    batches = iter(loader)
    for _ in range(t.max_steps):
        batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        times.append(time.perf_counter())
    return seconds_per_step(times, warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    a = ap.parse_args()

    from deltakd.recipe import validate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_data(tmp, a.batch_size * (a.steps + 2))
        recipe = validate({
            "name": "bench", "task": {"name": "sst2", "data_dir": str(tmp), "max_length": a.length},
            "model": {"name": "minilm-l6"},
            "peft": {"method": "lora", "r": 8, "alpha": 16, "target": ["query", "value"]},
            "train": {"max_steps": a.steps, "batch_size": a.batch_size, "lr": 5e-4, "logging_steps": 10},
            "track": [], "output_dir": str(tmp / "runs"),
        })
        ours, plain = [], []
        for r in range(a.rounds):  # interleaved, so drift in machine speed hits both
            ours.append(run_deltakd(recipe, a.warmup))
            plain.append(run_plain(recipe, a.warmup))
            print(f"round {r + 1}: deltakd {ours[-1]:.4f} s/step, plain {plain[-1]:.4f} s/step", flush=True)
    o, p = statistics.median(ours), statistics.median(plain)
    print(f"deltakd train: {o:.4f} s/step   plain PyTorch loop: {p:.4f} s/step   "
          f"(batch {a.batch_size}, length {a.length}, {a.steps} steps, {torch.get_num_threads()} threads)")
    print(f"overhead ratio deltakd/plain = {o / p:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
