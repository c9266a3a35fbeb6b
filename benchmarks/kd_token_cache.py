"""KD with a hidden-state loss: the token-level teacher cache against the live teacher (issue 19's job).

Teacher: MiniLM-L6 fully fine-tuned (one epoch, lr 5e-5) on the first ``--train`` SST-2 training
sentences. Student: its embeddings, layers 0, 2, 4, pooler and classifier copied. Loss 0.5 CE +
0.5 T^2 KL (T = 2) + hidden-state MSE, student layer i vs teacher layer 2i. AdamW lr 5e-5
constant, batch 32, max length 64, one epoch over the same sentences; accuracy on the SST-2 dev set.

The same recipe runs twice per round, once with ``distill.cache_teacher: true`` (the teacher's
per-token states of layers 0, 2, 4 and its logits read from the token cache, built once before the
first cached run: its size and build time are printed) and once with ``cache_teacher: false`` (the
teacher forward every step), interleaved in one process (ABBA order over rounds), so drift in the
machine's speed hits both. Prints training samples/s (whole epoch, and steady state after
``--warmup`` steps), the ratio, both dev accuracies and the teacher forwards of each.

    OMP_NUM_THREADS=1 python benchmarks/kd_token_cache.py [--train 3200] [--rounds 2] [--threads 1]
    python benchmarks/kd_token_cache.py --smoke      # 96 sentences, one round: a quick check that it runs
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

GLUE = Path("/work/shared/data/glue/sst2")
LAYERS = (0, 2, 4)


def write_data(src: Path, folder: Path, train: int, dev: int | None) -> Path:
    """train.tsv: the first ``train`` sentences of ``src``; dev.tsv: its first ``dev`` (None: all)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", train), ("dev.tsv", dev)):
        header, *rows = (src / name).read_text().splitlines()
        (folder / name).write_text("\n".join([header, *(rows if n is None else rows[:n])]) + "\n")
    return folder


class StepClock:
    """Training start and the end of every optimizer step (a Trainer callback)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self
        self.begin = 0.0
        self.steps: list[float] = []

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                clock.steps.append(time.perf_counter())

        self.callback = _Callback()


def run_student(recipe_data: dict, batch_size: int, warmup: int) -> dict:
    """One whole deltakd run of the recipe, with a step clock on its trainer."""
    from deltakd import families
    from deltakd.recipe import validate
    from deltakd.runner.lifecycle import run

    recipe = validate(recipe_data)
    fam = families.family_of(recipe)
    clock = StepClock()
    make = fam.make_trainer
    fam.make_trainer = lambda prep, args, cbs: make(prep, args, [*cbs, clock.callback])
    t0 = time.perf_counter()
    res = run(recipe, fam)
    wall = time.perf_counter() - t0
    n, steps = res.examples["train"], clock.steps
    steady = (len(steps) - 1 - warmup) * batch_size / (steps[-1] - steps[warmup]) if len(steps) > warmup + 1 else float("nan")
    return {"sps": n / (steps[-1] - clock.begin), "steady_sps": steady, "wall_s": wall,
            "accuracy": res.metrics["valid"]["accuracy"], "teacher_forwards": res.extra["distill"]["teacher_forwards"],
            "cache": res.extra["distill"]["teacher_cache"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=3200, help="training sentences (the first N of SST-2's train)")
    ap.add_argument("--dev", type=int, default=None, help="dev sentences (default all 872)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state rate")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--data", type=Path, default=GLUE)
    ap.add_argument("--smoke", action="store_true", help="96 sentences, 64 dev, one round")
    a = ap.parse_args()
    if a.smoke:
        a.train, a.dev, a.rounds, a.warmup = 96, 64, 1, 0
    if a.threads:
        torch.set_num_threads(a.threads)

    from deltakd import api
    from deltakd.distill import token_cache
    from deltakd.recipe import validate

    builds: list[dict] = []
    load_or_build = token_cache.load_or_build

    def timed(*args, **kwargs):  # the cache entry's build (first cached run) or load (later ones), timed
        t0 = time.perf_counter()
        cache = load_or_build(*args, **kwargs)
        builds.append({"s": time.perf_counter() - t0, "bytes": cache.nbytes if cache else None,
                       "tokens": int(cache.hidden.shape[0]) if cache else None})
        return cache

    token_cache.load_or_build = timed

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["DELTAKD_CACHE"] = str(tmp / "cache")
        data = write_data(a.data, tmp / "data", a.train, a.dev)
        base = {"task": {"name": "sst2", "data_dir": str(data), "max_length": 64}, "track": [],
                "output_dir": str(tmp / "runs")}
        t0 = time.perf_counter()
        teacher = api.train(validate({**base, "name": "teacher", "model": {"name": "minilm-l6"}, "peft": {"method": "full"},
                                      "train": {"epochs": 1, "lr": 5e-5, "batch_size": 32, "seed": 0,
                                                "logging_steps": 50, "save_optimizer": False}}))
        print(f"teacher trained in {time.perf_counter() - t0:.0f} s; dev accuracy "
              f"{teacher['metrics']['valid']['accuracy']:.3f}", flush=True)

        def student(cached: bool) -> dict:
            return {**base, "name": "cached" if cached else "live", "teacher": {"run": teacher["run_dir"]},
                    "student": {"from_teacher": {"layers": list(LAYERS)}}, "peft": {"method": "full"},
                    "distill": {"losses": {"ce": 0.5, "kd": 0.5, "hidden_mse": 1.0}, "temperature": 2.0,
                                "layer_map": {i: t for i, t in enumerate(LAYERS)}, "cache_teacher": cached},
                    "train": {"epochs": 1, "lr": 5e-5, "scheduler": "constant", "batch_size": 32, "seed": 0,
                              "logging_steps": 50, "save_optimizer": False}}

        runs: dict[str, list[dict]] = {"cached": [], "live": []}
        for r in range(a.rounds):
            order = ("cached", "live") if r % 2 == 0 else ("live", "cached")
            for who in order:
                res = run_student(student(who == "cached"), 32, a.warmup)
                runs[who].append(res)
                print(f"round {r + 1} {who:6s}: {res['sps']:.2f} samples/s (steady {res['steady_sps']:.2f}), "
                      f"dev accuracy {res['accuracy']:.4f}, teacher forwards {res['teacher_forwards']}, "
                      f"run {res['wall_s']:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)

    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("sps", "steady_sps", "accuracy")}
           for w, rs in runs.items()}
    print(f"\n{a.train} training sentences, batch 32, max length 64, {a.rounds} rounds, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()}")
    print("| teacher | samples/s (epoch) | samples/s (steady) | dev accuracy | teacher forwards |\n|---|---|---|---|---|")
    for w, label in (("live", "live every step"), ("cached", "token cache")):
        print(f"| {label} | {med[w]['sps']:.2f} | {med[w]['steady_sps']:.2f} | {med[w]['accuracy']:.4f} | "
              f"{runs[w][0]['teacher_forwards']} |")
    print(f"speed-up of the token cache: {med['cached']['sps'] / med['live']['sps']:.2f}x (epoch), "
          f"{med['cached']['steady_sps'] / med['live']['steady_sps']:.2f}x (steady)")
    first = builds[0]
    print(f"token cache: {first['bytes']} bytes ({first['bytes'] / 1e6:.1f} MB) for {first['tokens']} tokens x "
          f"{len(LAYERS)} layers x 384 x 2 bytes (+ logits); built in {first['s']:.1f} s (once); "
          f"loaded in {statistics.median(b['s'] for b in builds[1:]) if len(builds) > 1 else float('nan'):.2f} s")


if __name__ == "__main__":
    main()
