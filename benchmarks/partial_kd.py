"""The partial_kd comparison: teacher from scratch, then KD and no-KD students over seeds.

    python benchmarks/partial_kd.py [--seeds 1 2 3] [--output-dir runs/partial_kd_bench]

Trains recipes/partial_kd/teacher.yaml once, then student_kd.yaml, student_nokd.yaml and
student_kd_cached.yaml (the teacher's top-64 per token cached once, the teacher not run in training)
for each seed (same steps), and prints held-out perplexity and training tokens/s of each.

    python benchmarks/partial_kd.py --cross-tokenizer [--seeds 1 2 3] [--losses kd uld]

Distillation across tokenizers instead: xtok_teacher.yaml (BPE tokenizer A, 4096 tokens), then
per seed the 2-layer students with BPE tokenizer B (1024 tokens, same text): no-KD and one per
``--losses`` entry (kd: xtok_student_kd.yaml, ``kd_mapped``; uld: xtok_student_uld.yaml), same
steps; prints test bits per byte (comparable across tokenizers) and perplexity (per own token).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from deltakd import api

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--output-dir", default="runs/partial_kd_bench")
    ap.add_argument("--reuse-teacher", action="store_true", help="use the newest finished teacher in --output-dir")
    ap.add_argument("--cross-tokenizer", action="store_true", help="teacher and students with different tokenizers")
    ap.add_argument("--losses", nargs="+", default=["kd", "uld"], choices=["kd", "uld"],
                    help="--cross-tokenizer: the KD students to train")
    a = ap.parse_args()
    if a.cross_tokenizer:
        return cross_tokenizer(a)
    out = f"output_dir={a.output_dir}"
    recipes = ROOT / "recipes" / "partial_kd"
    from deltakd.runs import newest_finished

    done = newest_finished(Path(a.output_dir) / "partial-kd-teacher") if a.reuse_teacher else None
    teacher = done.read_results() if done else api.train(recipes / "teacher.yaml", [out])
    rows = [("teacher (4 layers)", [teacher])]
    for name, file in (("KD student (2 layers)", "student_kd.yaml"), ("no-KD student (2 layers)", "student_nokd.yaml"),
                       ("cached top-k KD student (2 layers)", "student_kd_cached.yaml")):
        runs = [api.train(recipes / file, [out, f"train.seed={s}", f"teacher.run={teacher['run_dir']}"])
                for s in a.seeds]
        rows.append((name, runs))
    print(f"\n| model | params | test ppl (mean ± std over seeds {a.seeds}) | per seed | valid ppl | tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, runs in rows:
        ppl = [r["metrics"]["test"]["perplexity"] for r in runs]
        vppl = [r["metrics"]["valid"]["perplexity"] for r in runs]
        tps = statistics.mean(r["train_tokens_per_second"] for r in runs)
        std = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        print(f"| {name} | {runs[0]['params']['total']:,} | {statistics.mean(ppl):.2f} ± {std:.2f} | "
              f"{', '.join(f'{p:.2f}' for p in ppl)} | {statistics.mean(vppl):.2f} | {tps:,.0f} |")
    kd = [r["metrics"]["test"]["perplexity"] for r in rows[1][1]]
    nokd = [r["metrics"]["test"]["perplexity"] for r in rows[2][1]]
    wins = sum(k < n for k, n in zip(kd, nokd))
    print(f"\nKD student below no-KD student on {wins}/{len(kd)} seeds")
    live, cached = rows[1][1], rows[3][1]
    tps = [statistics.mean(r["train_tokens_per_second"] for r in rs) for rs in (cached, live)]
    print(f"cached top-k KD / live KD: test perplexity {statistics.mean(r['metrics']['test']['perplexity'] for r in cached) / statistics.mean(kd):.4f}x, "
          f"training tokens/s {tps[0] / tps[1]:.2f}x, teacher forwards {cached[0]['distill']['teacher_forwards']} vs "
          f"{live[0]['distill']['teacher_forwards']}, {cached[0]['distill']['teacher_cache_bytes_per_token']} bytes per token")


def cross_tokenizer(a: argparse.Namespace) -> None:
    """Teacher with tokenizer A, 2-layer students with tokenizer B: no-KD vs KD across tokenizers."""
    from deltakd import api
    from deltakd.runs import newest_finished

    out, recipes = f"output_dir={a.output_dir}", ROOT / "recipes" / "partial_kd"
    done = newest_finished(Path(a.output_dir) / "partial-kd-xtok-teacher") if a.reuse_teacher else None
    teacher = done.read_results() if done else api.train(recipes / "xtok_teacher.yaml", [out])
    files = {"kd": ("KD student, kd_mapped (B)", "xtok_student_kd.yaml"),
             "uld": ("KD student, uld (B)", "xtok_student_uld.yaml")}
    rows: dict[str, list] = {"no-KD student (B)": []}
    rows.update({files[k][0]: [] for k in a.losses})
    for s in a.seeds:  # seed by seed: a partial run still compares every row on the seeds it finished
        over = [out, f"train.seed={s}", f"teacher.run={teacher['run_dir']}"]
        rows["no-KD student (B)"].append(api.train(recipes / "xtok_student_nokd.yaml", [out, f"train.seed={s}"]))
        for k in a.losses:
            rows[files[k][0]].append(api.train(recipes / files[k][1], over))
    print(f"\n| model | params | test bits/byte (mean ± std, seeds {a.seeds}) | per seed | test ppl (own tokens) |")
    print("|---|---|---|---|---|")
    for name, runs in [("teacher, 4 layers (A)", [teacher]), *((f"{n}, 2 layers", r) for n, r in rows.items())]:
        bpb = [r["metrics"]["test"]["bits_per_byte"] for r in runs]
        ppl = [r["metrics"]["test"]["perplexity"] for r in runs]
        std = statistics.stdev(bpb) if len(bpb) > 1 else 0.0
        print(f"| {name} | {runs[0]['params']['total']:,} | {statistics.mean(bpb):.4f} ± {std:.4f} | "
              f"{', '.join(f'{b:.4f}' for b in bpb)} | {statistics.mean(ppl):.2f} |")
    nokd = [r["metrics"]["test"]["bits_per_byte"] for r in rows["no-KD student (B)"]]
    for k in a.losses:
        kd = [r["metrics"]["test"]["bits_per_byte"] for r in rows[files[k][0]]]
        print(f"{files[k][0]} below the no-KD student's test bits/byte on {sum(x < y for x, y in zip(kd, nokd))}"
              f"/{len(kd)} seeds")


if __name__ == "__main__":
    main()
