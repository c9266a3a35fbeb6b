"""The multistage measurement of issue 4: teacher vs `mse` student vs best compressed stage-4 student.

Runs (through ``deltakd.pipeline.run_pipeline``, so finished stages are skipped on a rerun):

    mse -> bottleneck_distill -> rec_bottle_distill -> <stage 4 variants, default rec_bottle_mcl>

with the recipes in recipes/multistage/ and size overrides from the command line, then prints

    model | STS en-de Spearman x100 | translation acc (en<->de) | parameters | sentences/s

for the teacher itself (an English model on German input), the full-size `mse` student and the
best stage-4 student (by en-de Spearman), and whether the target holds: the compressed student
with at least 50% fewer parameters than the teacher within 1 Spearman point of `mse`. The three
models' sentences/s are timed again at the end, in turn in this one process.

Structure of the recurrent stages: ``--k`` kept layers (default 3), ``--order`` (default nearest:
each position runs the kept layer nearest its depth), ``--search`` (default on: the kept layers
are the k-subset whose untrained student is closest to the teacher on training sentences).
Measured (2000 pairs per language, 1 epoch per stage, full STS-B test, 2-core CPU): teacher 29.04,
mse 30.03, rec_bottle_mcl 34.89 Spearman x100 with 57.6% fewer parameters (layers [0, 3, 5] run
as 0 0 3 3 3 5); k=2 cycled ([0, 3] as 0 3 0 3 0 3) reached only 24.94. Stages 1-2 took ~12 min,
stages 3-4 ~5 min.

Sizes: ``--pairs`` training pairs per language (Multi30k en-de + en-fr), ``--heldout`` pairs per
language for retrieval, ``--epochs``. ``--smoke`` swaps in a 4-layer hidden-32 random teacher and
a few pairs to check the script end to end in a minute.

    OMP_NUM_THREADS=2 python benchmarks/multistage.py                 # the measurement
    OMP_NUM_THREADS=1 python benchmarks/multistage.py --smoke         # plumbing check
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "recipes" / "multistage"
DATA = ROOT.parent / "shared" / "data" / "parallel"
CHAIN = ["mse", "bottleneck_distill", "rec_bottle_distill"]


def tiny_teacher(out: Path) -> Path:
    """4-layer hidden-32 random BERT with MiniLM's tokenizer (plain HF folder: mean pooling)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from deltakd.models.hub import resolve_model_path

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm-l6"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def overrides(args: argparse.Namespace, stage: str, teacher: str) -> list[str]:
    raw = (STAGES / f"{stage}.yaml").read_text()
    out = [f"teacher.model={teacher}",
           f"data.train=[{DATA / 'multi30k' / 'train.en-de.tsv.gz'}, {DATA / 'multi30k' / 'train.en-fr.tsv.gz'}]",
           f"data.limit_per_file={args.pairs}", f"data.heldout={args.heldout}",
           f"eval.sts.data_dir={DATA / 'stsb_multi_mt'}", f"eval.sts.pairs=[{', '.join(args.sts)}]",
           f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
           f"output_dir={args.log_dir}"]
    if args.sts_limit:
        out.append(f"eval.sts.limit={args.sts_limit}")
    if args.max_steps:
        out.append(f"train.max_steps={args.max_steps}")
    if "bottleneck:" in raw:
        out.append(f"student.bottleneck.dim={args.bottleneck_dim}")
    if "recurrence:" in raw:
        out += [f"student.recurrence.k={args.k}", f"student.recurrence.order={args.order}",
                f"student.recurrence.search={str(args.search).lower()}"]
    if stage == "mse":
        out.append("eval.teacher=true")
    return out


def interleaved_speed(models: dict[str, object], sentences: list[str], rounds: int = 3) -> dict[str, float]:
    """Sentences/s of each SentenceTransformer, timed in turn ``rounds`` times in this one process
    (median): the runs' own figures were taken at different times, under different machine load."""
    import statistics

    from deltakd.multistage.evaluate import encode_speed, st_encoder

    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(encode_speed(st_encoder(model), sentences))
    return {name: statistics.median(v) for name, v in times.items()}


def row(name: str, measured: dict, params: int, lang: str, sts: str) -> dict:
    test, held = measured.get("test", {}), measured.get("heldout", {})
    return {"model": name, "spearman_x100": 100 * test.get(f"sts/{sts}/spearman", float("nan")),
            "acc": held.get(f"{lang}/acc", float("nan")), "params": params,
            "sent_per_s": measured.get("speed_sent_per_s", float("nan"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=2000, help="training pairs per language file (Multi30k)")
    p.add_argument("--heldout", type=int, default=300, help="held-out pairs per language (translation accuracy)")
    p.add_argument("--sts", nargs="+", default=["en-de", "en-fr"], help="cross-lingual STS sets")
    p.add_argument("--sts-limit", type=int, default=None, help="first N STS rows (quick runs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--bottleneck-dim", type=int, default=128)
    p.add_argument("--k", type=int, default=3, help="distinct layers of the recurrent students")
    p.add_argument("--order", choices=["cycle", "block", "nearest"], default="nearest",
                   help="how the k layers are reused (recipes' student.recurrence.order)")
    p.add_argument("--search", action=argparse.BooleanOptionalAction, default=True,
                   help="choose the k kept layers by the untrained student's MSE to the teacher (training sentences)")
    p.add_argument("--stage4", nargs="+", default=["rec_bottle_mcl"],
                   help="stage-4 recipes to compare (e.g. rec_bottle_mcl rec_bottle_mse rec_bottle_ce)")
    p.add_argument("--speed-sentences", type=int, default=512,
                   help="English sentences timed per model for sentences/s (teacher, mse, best stage 4 in turn, 3 rounds)")
    p.add_argument("--teacher", default="minilm-l6")
    p.add_argument("--log-dir", type=Path, default=ROOT / "runs" / "bench-multistage")
    p.add_argument("--smoke", action="store_true", help="tiny random teacher and a few pairs: plumbing check")
    args = p.parse_args()

    from deltakd.errors import DeltakdError
    from deltakd.pipeline import run_pipeline
    from deltakd.utils import atomic_write_json

    scratch = None
    teacher = args.teacher
    if args.smoke:
        scratch = tempfile.TemporaryDirectory(prefix="deltakd-ms-smoke-")
        teacher = str(tiny_teacher(Path(scratch.name) / "teacher"))
        args.pairs, args.heldout, args.sts_limit = 48, 6, args.sts_limit or 24
        args.max_steps, args.batch_size, args.lr, args.bottleneck_dim = args.max_steps or 6, 8, 1e-3, 8
        if args.log_dir == ROOT / "runs" / "bench-multistage":
            args.log_dir = Path(scratch.name) / "runs"
    started = time.time()
    results: dict[str, dict] = {}
    run_dirs: dict[str, Path] = {}
    try:
        for stage in [*CHAIN, *args.stage4]:
            [outcome] = run_pipeline([STAGES / f"{stage}.yaml"], overrides(args, stage, teacher))
            results[stage] = outcome.results
            run_dirs[stage] = outcome.run_dir
            print(f"{stage}: {outcome.status} ({outcome.run_dir})", flush=True)
    except DeltakdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sts = args.sts[0]
    lang = sts.split("-")[1]
    mse = results["mse"]
    rows = [row(f"teacher ({args.teacher if not args.smoke else 'tiny'}, {lang} input)", mse["teacher"],
                mse["teacher"]["params"], lang, sts),
            row("mse student (full size)", {**mse["metrics"], "speed_sent_per_s": mse["speed_sent_per_s"]},
                mse["params"]["total"], lang, sts)]
    stage4 = [row(f"{s} student", {**results[s]["metrics"], "speed_sent_per_s": results[s]["speed_sent_per_s"]},
                  results[s]["params"]["total"], lang, sts) for s in args.stage4]
    best = max(stage4, key=lambda r: r["spearman_x100"])
    rows.append(best)
    from sentence_transformers import SentenceTransformer

    from deltakd.multistage.data import read_parallel
    from deltakd.multistage.teacher import load_teacher

    best_stage = args.stage4[stage4.index(best)]
    timed = {"teacher": load_teacher(teacher), "mse": SentenceTransformer(str(run_dirs["mse"] / "model"), device="cpu"),
             best_stage: SentenceTransformer(str(run_dirs[best_stage] / "model"), device="cpu")}
    english = [p.english for p in read_parallel(DATA / "multi30k" / "train.en-de.tsv.gz", limit=args.speed_sentences)]
    speeds = interleaved_speed(timed, english)
    for r, name in zip(rows, ("teacher", "mse", best_stage)):
        r["sent_per_s"] = speeds[name]
    print(f"\nmultistage, {args.pairs} pairs/language, {args.epochs} epoch(s), STS {sts} "
          f"({'first ' + str(args.sts_limit) + ' rows' if args.sts_limit else 'test'}), held-out {args.heldout}/language")
    print(f"| model | STS {sts} Spearman x100 | translation acc en<->{lang} | parameters | sentences/s (timed in turn) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['spearman_x100']:.2f} | {r['acc']:.3f} | {r['params']:,} | {r['sent_per_s']:.1f} |")
    if len(stage4) > 1:
        print("\nstage-4 variants: " + ", ".join(f"{r['model']} {r['spearman_x100']:.2f}" for r in stage4))
    teacher_params = mse["params"]["teacher"]
    smaller = 1 - best["params"] / teacher_params
    gap = rows[1]["spearman_x100"] - best["spearman_x100"]
    ok = smaller >= 0.5 and gap <= 1.0
    print(f"\ntarget (>= 50% fewer parameters than the teacher, within 1 Spearman point of mse): "
          f"{100 * smaller:.1f}% fewer, {abs(gap):.2f} points {'behind' if gap > 0 else 'above'} mse -> "
          f"{'met' if ok else 'not met'}")
    print(f"wall time {(time.time() - started) / 60:.1f} min; runs under {args.log_dir}")
    atomic_write_json(args.log_dir / "multistage_summary.json", {"rows": rows, "stage4": stage4, "target_met": ok,
                                                                 "args": {k: str(v) for k, v in vars(args).items()}})
    if scratch is not None:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
