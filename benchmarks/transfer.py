"""The transfer measurement: MiniLM-L6 + LoRA source modules, k-shot targets (leave-one-out), seeds.

    python benchmarks/transfer.py [--preset full|cpu|tiny] [--sources sst2 mr ...] [--targets mr cr ...]
        [--k 64] [--seeds 1 2 3] [--estimators task_groups cosine ...] [--source-samples N]
        [--target-epochs E] [--eval-samples N] [--output-dir runs/bench-transfer]

Runs recipes/transfer/minilm_lora.yaml through ``deltakd transfer`` (resumable: finished source
modules, estimates and target runs are reused) with the preset's size, then prints the target test
accuracy of random init, the uniform average, the best single source and each estimator's fusion
(mean ± std over seeds per target, and the average over targets), and checks the issue's targets:
the best estimator beats random init by >= 3 points on average and beats the uniform average.

Presets (each option below overrides its preset value):
- ``full``: the recipe as written (10 sources, 4 targets, 64-shot, 3 seeds, 2x2 grid, 4000 source
  examples) with every registered estimator (``deltakd.transfer.estimators.ESTIMATORS`` but the
  ``uniform`` baseline, which is a start of its own: task_groups, cosine, euclidean, dev_change, loss,
  kl, kl_shift, kl_original, el2n, grand, logits_labels); hours on a 2-core CPU, minutes on a GPU.
- ``cpu``: 6 sources, 4 targets, 64-shot, 3 seeds, 3 estimators,
  one grid cell, 2000 source examples x 2 epochs, 8 target epochs, valid/test capped at 200 examples,
  no factor-wise LoRA baseline. Measured on 2 cores: ~3 minutes per source module, then 5-9 minutes
  per target and seed (estimation, mostly the short tuning of best_single and cosine, then the six
  starts): about 1.5 hours for all 12 target/seed pairs.
- ``tiny``: a few minutes, to check the pipeline: 3 sources, 1 target, 16-shot, 1 seed, 2 estimators.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "transfer" / "minilm_lora.yaml"

PRESETS: dict[str, dict] = {
    "full": {"estimators": "all"},  # every estimator of the registry (resolved in preset())
    "cpu": {"sources": ["sst2", "mr", "cr", "subj", "mpqa", "rte"], "targets": ["mr", "cr", "subj", "rte"],
            "k": 64, "seeds": [1, 2, 3], "estimators": ["task_groups", "cosine", "loss"], "factor_baseline": False,
            "source_samples": 2000, "source_epochs": 2, "grid": ([1e-3], [32]), "target_epochs": 8,
            "eval_samples": 200, "estimate_steps": 10},
    "tiny": {"sources": ["sst2", "mr", "cr"], "targets": ["mr"], "k": 16, "seeds": [1],
             "estimators": ["task_groups", "loss"], "source_samples": 64, "source_epochs": 1,
             "grid": ([1e-3], [16]), "target_epochs": 1, "eval_samples": 32, "estimate_steps": 2},
}


# preset key -> the recipe keys it sets (lists become YAML flow lists)
KEYS: dict[str, tuple[str, ...]] = {
    "sources": ("transfer.sources",), "targets": ("transfer.targets",), "k": ("transfer.target.k",),
    "seeds": ("transfer.target.seeds",), "estimators": ("transfer.estimate.estimators",),
    "source_samples": ("transfer.library.max_train_samples",), "source_epochs": ("transfer.library.train.epochs",),
    "target_epochs": ("transfer.target.train.epochs",), "estimate_steps": ("transfer.estimate.steps",),
    "eval_samples": ("transfer.target.max_eval_samples", "transfer.library.max_eval_samples"),
    "factor_baseline": ("transfer.fusion.factor_baseline",),
}


def _value(v) -> str:
    return f"[{', '.join(map(str, v))}]" if isinstance(v, (list, tuple)) else str(v)


def overrides_for(p: dict, output_dir: str, library: str | None) -> list[str]:
    out = [f"output_dir={output_dir}"] + ([f"transfer.library.dir={library}"] if library else [])
    out += [f"{key}={_value(p[name])}" for name, keys in KEYS.items() if name in p for key in keys]
    if "grid" in p:
        lrs, bss = p["grid"]
        out += [f"transfer.library.grid.lr={_value(lrs)}", f"transfer.library.grid.batch_size={_value(bss)}"]
    if "eval_samples" in p:
        out.append(f"transfer.estimate.dev_samples={min(p['eval_samples'], 256)}")
    return out


def preset(name: str) -> dict:
    """The preset's settings, ``estimators: all`` resolved to every registered estimator but ``uniform``."""
    p = dict(PRESETS[name])
    if p.get("estimators") == "all":
        from deltakd.transfer.estimators import ESTIMATORS

        p["estimators"] = [e for e in ESTIMATORS if e != "uniform"]
    return p


def main() -> None:
    from deltakd.transfer.report import pm
    from deltakd.transfer.results import summarise
    from deltakd.transfer.run import run_transfer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--sources", nargs="+")
    ap.add_argument("--targets", nargs="+")
    ap.add_argument("--k", type=int)
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--estimators", nargs="+")
    ap.add_argument("--source-samples", type=int)
    ap.add_argument("--target-epochs", type=float)
    ap.add_argument("--eval-samples", type=int)
    ap.add_argument("--output-dir", default=None, help="default runs/bench-transfer-<preset>")
    ap.add_argument("--library", default=None, help="module library folder (default: the recipe's)")
    a = ap.parse_args()
    p = preset(a.preset)
    for key in ("sources", "targets", "k", "seeds", "estimators", "source_samples", "target_epochs", "eval_samples"):
        if getattr(a, key) is not None:
            p[key] = getattr(a, key)
    out = a.output_dir or f"runs/bench-transfer-{a.preset}"
    res = run_transfer(RECIPE, overrides_for(p, out, a.library))
    targets = list(dict.fromkeys(r.target for r in res.runs))
    table = summarise(res, targets)
    metric = res.runs[0].metric if res.runs else "test_accuracy"
    seeds = sorted({r.seed for r in res.runs})
    print(f"\nTransfer ({a.preset}): MiniLM-L6 + LoRA, {len(res.modules)} source modules "
          f"({', '.join(res.modules)}), targets {', '.join(targets)} (leave-one-out), "
          f"{p.get('k', 64)}-shot, seeds {seeds}; {metric.replace('_', ' ')} x100, mean ± std over seeds")
    head = ["start", *targets, "mean", "Δ random", "Δ uniform"]
    width = [max(15, len(h)) for h in head]
    print("  ".join(h.ljust(w) for h, w in zip(head, width)))
    mean = {s: table[s]["mean"][0] for s in res.starts}
    for s in res.starts:
        cells = [s, *[pm(100 * table[s][t][0], 100 * table[s][t][1]) for t in targets],
                 pm(100 * mean[s], 100 * table[s]["mean"][1]),
                 "" if s == "random" else f"{100 * (mean[s] - mean['random']):+.2f}",
                 "" if s in ("random", "uniform") else f"{100 * (mean[s] - mean['uniform']):+.2f}"]
        print("  ".join(c.ljust(w) for c, w in zip(cells, width)))
    estimators = [s for s in res.starts if s not in ("random", "uniform", "best_single", "uniform_factors")
                  and not math.isnan(mean[s])]
    if estimators:
        best = max(estimators, key=lambda s: mean[s])
        d_rand, d_unif = 100 * (mean[best] - mean["random"]), 100 * (mean[best] - mean["uniform"])
        print(f"\nbest estimator: {best} — {d_rand:+.2f} points over random init (target >= +3: "
              f"{'met' if d_rand >= 3 else 'NOT met'}), {d_unif:+.2f} over the uniform average (target > 0: "
              f"{'met' if d_unif > 0 else 'NOT met'})")
    print(f"results: {res.files['markdown']}  heatmap: {res.files['heatmap']}")


if __name__ == "__main__":
    main()
