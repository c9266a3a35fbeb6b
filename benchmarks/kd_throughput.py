"""Distillation throughput: student alone vs KD with a live teacher vs KD with the cached teacher.

Same 3-layer student (MiniLM-L6 layers 0, 2, 4, full fine-tuning), same data, batch size and
sequence length (every sequence exactly ``--length`` tokens) in all three:

  (a) the student fine-tuned on labels only (no teacher forward),
  (b) logit KD (ce 0.5 + kd 0.5) with the teacher run live every step,
  (c) the same KD with teacher outputs from the on-disk cache (built once before timing; its
      build time is printed separately: it is paid once per teacher and data, not per run).

Also compares the LoRA teacher as adapter vs merged: largest logit difference and forward speed.
The teacher is MiniLM-L6 + LoRA r=8 (query, key, value, dense), trained a few steps; quality
does not matter for speed.

    python benchmarks/kd_throughput.py [--steps 40] [--rounds 2]

Prints samples/s of each, the time ratio (c)/(a) (goal <= 1.10) and (b)/(c).

    python benchmarks/kd_throughput.py --bf16 [--steps 40] [--rounds 2] [--train-rows 2000]

Mixed precision instead: the same KD job (b) (live teacher, ce 0.5 + kd 0.5) on real SST-2
sentences (the shipped sample, ``data/sst2``), trained in fp32 and in bf16 (``train.bf16: force``:
student under autocast, teacher cast to bf16), interleaved; prints samples/s of both, the ratio
bf16/fp32, both dev accuracies (872 sentences) and their difference, and whether this device has
native bf16 (without it, the bf16 run is emulated and slow: a recipe's ``bf16: true`` runs fp32 there).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_overhead import StepClock, make_data, seconds_per_step  # noqa: E402


def step_time(recipe, warmup: int) -> tuple[float, float]:
    """Seconds per training step after ``warmup`` steps, and seconds spent preparing (cache build)."""
    from deltakd import families
    from deltakd.runner import training_arguments
    from deltakd.runner.callbacks import MetricsLogCallback
    from deltakd.runs import new_run_dir

    t0 = time.perf_counter()
    fam = families.family_of(recipe)
    prep = fam.prepare(recipe)
    prepare_s = time.perf_counter() - t0
    clock = StepClock()
    run = new_run_dir(recipe.output_dir, recipe.name)
    args = training_arguments(recipe.train, run, [], prep.task.spec.main_metric)
    trainer = fam.make_trainer(prep, args, [MetricsLogCallback(run), clock])
    trainer.train()
    return seconds_per_step(clock.times, warmup), prepare_s


def timed_accuracy(recipe, warmup: int) -> tuple[float, float]:
    """Seconds per training step after ``warmup`` steps, and the trained student's dev accuracy."""
    from deltakd import families
    from deltakd.runner import training_arguments
    from deltakd.runs import new_run_dir

    fam = families.family_of(recipe)
    prep = fam.prepare(recipe)
    clock = StepClock()
    args = training_arguments(recipe.train, new_run_dir(recipe.output_dir, recipe.name), [],
                              prep.task.spec.main_metric, has_eval=False)
    trainer = fam.make_trainer(prep, args, [clock])
    trainer.train()
    accuracy = trainer.evaluate(prep.datasets["valid"])["eval_accuracy"]
    return seconds_per_step(clock.times, warmup), float(accuracy)


def bf16_vs_fp32(a: argparse.Namespace) -> None:
    """The same KD job in fp32 and in bf16: samples/s ratio and dev accuracy difference."""
    from deltakd import api
    from deltakd.recipe import validate
    from deltakd.utils import native_bf16

    native, device = native_bf16()
    sst2 = Path(__file__).resolve().parents[1] / "data" / "sst2"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["DELTAKD_CACHE"] = str(tmp / "cache")
        train = (sst2 / "train.tsv").read_text().splitlines()
        (tmp / "train.tsv").write_text("\n".join(train[:a.train_rows + 1]) + "\n")
        (tmp / "dev.tsv").write_text((sst2 / "dev.tsv").read_text())
        base = {"task": {"name": "sst2", "data_dir": str(tmp), "max_length": a.length},
                "track": [], "output_dir": str(tmp / "runs")}
        teacher = api.train(validate({
            **base, "name": "teacher", "model": {"name": "minilm-l6"},
            "peft": {"method": "lora", "r": 8, "alpha": 16, "target": ["query", "key", "value", "dense"],
                     "merge": True},
            "train": {"max_steps": a.teacher_steps, "batch_size": a.batch_size, "lr": 1e-3, "eval_every": 10_000}}))
        t_acc = teacher["metrics"]["valid"]["accuracy"]

        def student(bf16: bool | str):
            return validate({
                **base, "name": f"kd-{'bf16' if bf16 else 'fp32'}", "teacher": {"run": teacher["run_dir"],
                                                                             "merged": True},
                "student": {"from_teacher": {"layers": [0, 2, 4]}}, "peft": {"method": "full"},
                "distill": {"losses": {"ce": 0.5, "kd": 0.5}, "cache_teacher": False},
                "train": {"max_steps": a.steps, "batch_size": a.batch_size, "lr": 1e-4, "logging_steps": 10,
                          "bf16": bf16, "seed": 7}})

        recipes = {"fp32": student(False), "bf16": student("force")}
        times: dict[str, list[float]] = {k: [] for k in recipes}
        accs: dict[str, list[float]] = {k: [] for k in recipes}
        for r in range(a.rounds):
            for k, recipe in recipes.items():
                s, acc = timed_accuracy(recipe, a.warmup)
                times[k].append(s)
                accs[k].append(acc)
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.4f} s/step acc {accs[k][-1]:.4f}"
                                               for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    acc = {k: statistics.median(v) for k, v in accs.items()}
    print(f"\n{device}: native bf16 {'yes' if native else 'no (bf16 forced: emulated)'}; batch {a.batch_size}, "
          f"max length {a.length}, {a.steps} steps x {a.rounds} rounds, {torch.get_num_threads()} threads; "
          f"teacher (MiniLM-L6 LoRA, {a.teacher_steps} steps) dev accuracy {t_acc:.4f}")
    print("| precision | s/step | samples/s | dev accuracy |\n|---|---|---|---|")
    for k in recipes:
        print(f"| {k} | {med[k]:.4f} | {a.batch_size / med[k]:.1f} | {acc[k]:.4f} |")
    print(f"samples/s ratio bf16/fp32 = {med['fp32'] / med['bf16']:.3f}; "
          f"dev accuracy bf16 - fp32 = {100 * (acc['bf16'] - acc['fp32']):+.2f} points")


def teacher_forward_speed(model_dir: Path, batch: dict, repeats: int) -> tuple[float, torch.Tensor]:
    from deltakd.models.delta import load_trained

    results = {}
    for merged in (False, True):
        model, _ = load_trained(model_dir, merged=merged)
        with torch.no_grad():
            model(**batch)  # warm-up
            t0 = time.perf_counter()
            for _ in range(repeats):
                logits = model(**batch).logits
            results[merged] = ((time.perf_counter() - t0) / repeats, logits)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--bf16", action="store_true", help="bf16 vs fp32 on the same KD job (samples/s, dev accuracy)")
    ap.add_argument("--train-rows", type=int, default=2000, help="--bf16: SST-2 training sentences")
    ap.add_argument("--teacher-steps", type=int, default=60, help="--bf16: the teacher's training steps")
    a = ap.parse_args()
    if a.bf16:
        bf16_vs_fp32(a)
        return

    from deltakd import api
    from deltakd.models.delta import find_model_dir
    from deltakd.recipe import validate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["DELTAKD_CACHE"] = str(tmp / "cache")
        make_data(tmp, a.batch_size * (a.steps + 2))
        base = {"task": {"name": "sst2", "data_dir": str(tmp), "max_length": a.length},
                "track": [], "output_dir": str(tmp / "runs")}
        teacher = api.train(validate({
            **base, "name": "teacher", "model": {"name": "minilm-l6"},
            "peft": {"method": "lora", "r": 8, "alpha": 16, "target": ["query", "key", "value", "dense"],
                     "merge": True},
            "train": {"max_steps": 3, "batch_size": a.batch_size, "lr": 1e-3}}))

        def student(name: str, losses: dict, cache: bool):
            return validate({
                **base, "name": name, "teacher": {"run": teacher["run_dir"]},
                "student": {"from_teacher": {"layers": [0, 2, 4]}}, "peft": {"method": "full"},
                "distill": {"losses": losses, "cache_teacher": cache},
                "train": {"max_steps": a.steps, "batch_size": a.batch_size, "lr": 1e-4, "logging_steps": 10}})

        recipes = {"a": student("alone", {"ce": 1.0}, False), "b": student("live", {"ce": 0.5, "kd": 0.5}, False),
                   "c": student("cached", {"ce": 0.5, "kd": 0.5}, True)}
        times: dict[str, list[float]] = {k: [] for k in recipes}
        build_s = None
        for r in range(a.rounds):  # interleaved, so drift in machine speed hits all three
            for k, recipe in recipes.items():
                s, prep_s = step_time(recipe, a.warmup)
                times[k].append(s)
                if k == "c" and build_s is None:
                    build_s = prep_s  # the first cached run builds the cache
            print(f"round {r + 1}: " + "  ".join(f"({k}) {v[-1]:.4f} s/step" for k, v in times.items()), flush=True)

        from transformers import AutoTokenizer

        model_dir = find_model_dir(teacher["run_dir"])
        tok = AutoTokenizer.from_pretrained(model_dir)
        lines = (tmp / "train.tsv").read_text().splitlines()[1:a.batch_size + 1]
        batch = tok([line.split("\t")[0] for line in lines], truncation=True, max_length=a.length,
                    padding="max_length", return_tensors="pt")
        speeds = teacher_forward_speed(model_dir, dict(batch), repeats=10)

    med = {k: statistics.median(v) for k, v in times.items()}
    sps = {k: a.batch_size / v for k, v in med.items()}
    print(f"\nbatch {a.batch_size}, length {a.length}, {a.steps} steps x {a.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print("| setting | s/step | samples/s |\n|---|---|---|")
    for k, label in (("a", "(a) student alone"), ("b", "(b) KD, live teacher"), ("c", "(c) KD, cached teacher")):
        print(f"| {label} | {med[k]:.4f} | {sps[k]:.1f} |")
    print(f"teacher cache build (one-off, {a.batch_size * (a.steps + 2)} examples): {build_s:.1f} s")
    print(f"time ratio (c)/(a) = {med['c'] / med['a']:.3f}  (goal <= 1.10)")
    print(f"time ratio (b)/(c) = {med['b'] / med['c']:.3f}  (what the cache saves)")
    (ta, la), (tm, lm) = speeds[False], speeds[True]
    print(f"\nteacher forward, batch {a.batch_size}: adapter {1000 * ta:.1f} ms, merged {1000 * tm:.1f} ms "
          f"-> merged is {ta / tm:.2f}x faster; max |logit difference| = {(la - lm).abs().max().item():.2e} "
          f"(goal <= 1e-5)")


if __name__ == "__main__":
    main()
