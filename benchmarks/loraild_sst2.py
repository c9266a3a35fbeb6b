"""The loraild measurement: SST-2, MiniLM-L6 + LoRA teacher, 3-layer students by five methods x 3 seeds.

    python benchmarks/loraild_sst2.py [--data ../shared/data/glue/sst2] [--train-samples 20000]
        [--teacher-epochs 3] [--student-epochs 3] [--methods nokd lorakd ...] [--seeds 1 2 3]

Trains recipes/loraild/teacher.yaml once (reused when a finished run is already in the output
folder), then each student recipe as a seed sweep (``deltakd sweep``: resumable, finished trials
skipped) at one learning rate per method, and prints the teacher's test accuracy and each
method's mean ± std over seeds, its share of the teacher's accuracy and its training speed.
Train split: the data's train file re-split 9:1 with split_seed 0, then a seeded subset of
``--train-samples`` sentences; test: the GLUE dev set (872 sentences).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
LR = {"nokd": 1e-4, "lorakd": 1e-4, "railkd_c": 1e-4, "railkd_l": 1e-4, "curriculum_railkd": 1e-4,
      "curriculum_full_loraild": 1e-4, "loraild_average": 1e-4, "loraild_random": 1e-4}


def main() -> None:
    from deltakd import api
    from deltakd.recipe import load_recipe
    from deltakd.runs import newest_finished

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/glue/sst2"))
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--teacher-epochs", type=float, default=3)
    ap.add_argument("--student-epochs", type=float, default=3)
    ap.add_argument("--methods", nargs="+", default=["nokd", "lorakd", "railkd_c", "railkd_l",
                                                      "curriculum_full_loraild"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--output-dir", default="runs/loraild_sst2")
    a = ap.parse_args()
    recipes = ROOT / "recipes" / "loraild"
    common = [f"task.data_dir={a.data}", f"task.max_train_samples={a.train_samples}", f"output_dir={a.output_dir}"]
    done = newest_finished(Path(a.output_dir) / "loraild-teacher")
    if done is not None:
        teacher = done.read_results()
    else:
        teacher = api.train(recipes / "teacher.yaml", [*common, f"train.epochs={a.teacher_epochs}"])
    t_acc = teacher["metrics"]["test"]["accuracy"]
    rows = []
    for method in a.methods:
        overrides = [*common, f"teacher.run={teacher['run_dir']}"]
        recipe = load_recipe(recipes / f"{method}.yaml", overrides)  # as written: its own epochs
        cur = recipe.distill.curriculum if recipe.distill else None
        if cur is not None:  # keep the switch at the same share of training when the epochs change
            overrides.append(f"distill.curriculum.at_epoch={cur.at_epoch * a.student_epochs / recipe.train.epochs:.4g}")
        overrides.append(f"train.epochs={a.student_epochs}")
        res = api.sweep(recipes / f"{method}.yaml", [
            *overrides, f"sweep.train.lr=[{LR[method]}]", f"sweep.train.seed={a.seeds}"], progress=True)
        results = [json.loads((Path(t.run_dir) / "results.json").read_text()) for t in res.trials]
        rows.append((method, results))
    print(f"\nSST-2 ({a.train_samples} training sentences; test = GLUE dev, 872), MiniLM-L6 + LoRA teacher "
          f"(test accuracy {100 * t_acc:.2f}), 3-layer students (teacher layers 0, 2, 4), seeds {a.seeds}")
    print("| method | test acc. mean ± std | per seed | % of teacher | valid acc. | params | train samples/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| teacher (LoRA r 8) | {100 * t_acc:.2f} | - | 100 | {100 * teacher['metrics']['valid']['accuracy']:.2f} "
          f"| {teacher['params']['total']:,} ({teacher['params']['trainable']:,} trainable) | "
          f"{teacher['train_samples_per_second']:.1f} |")
    best = None
    for method, results in rows:
        acc = [100 * r["metrics"]["test"]["accuracy"] for r in results]
        val = statistics.mean(100 * r["metrics"]["valid"]["accuracy"] for r in results)
        mean, std = statistics.mean(acc), statistics.stdev(acc) if len(acc) > 1 else 0.0
        sps = statistics.mean(r["train_samples_per_second"] for r in results)
        print(f"| {method} (lr {LR[method]:g}) | {mean:.2f} ± {std:.2f} | {', '.join(f'{x:.2f}' for x in acc)} | "
              f"{mean / (100 * t_acc) * 100:.1f} | {val:.2f} | {results[0]['params']['total']:,} | {sps:.1f} |")
        if method != "nokd" and (best is None or mean > best[1]):
            best = (method, mean)
    nokd = next((statistics.mean(100 * r["metrics"]["test"]["accuracy"] for r in rs) for m, rs in rows
                 if m == "nokd"), None)
    if best is not None:
        print(f"\nbest KD student: {best[0]} at {best[1] / (100 * t_acc) * 100:.1f}% of the teacher (target >= 97%)"
              + (f", {best[1] - nokd:+.2f} points vs nokd" if nokd is not None else ""))


if __name__ == "__main__":
    main()
