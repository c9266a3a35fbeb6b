"""The seed-scale jobs on this machine's accelerator: samples/s, peak memory, bf16/fp32 and cached/live.

Random-weight models of the seed papers' shapes (offline; speed and memory depend on the shape,
not the weights), the shipped data samples, ``--steps`` training steps of each job:

  classification KD   a RoBERTa-large-shaped teacher (24 layers, hidden 1024) + LoRA, fine-tuned;
                      a 6-layer student from its layers, logit KD: live teacher and cached teacher,
                      fp32 and bf16 (cached / live and bf16 / fp32 ratios)
  multistage          the packaged all-MiniLM-L6-v2 sentence teacher, one MSE stage on text pairs
  dialogue LoRA       a DialoGPT-small-shaped GPT-2 (12 layers, hidden 768) pre-trained a few
                      steps on the DailyDialog sample, then LoRA-tuned on its responses
  partial_kd          a GPT-2 (124M)-shaped teacher trained on the TinyStories sample; a 6-layer
                      student from its layers, logit KD

    python benchmarks/gpu_check.py [--steps 300] [--batch-size 32]
    python benchmarks/gpu_check.py --tiny [--steps 4]     # the same code on CPU with tiny shapes (< 3 min)

Each timed job runs through deltakd's family code (prepare, Trainer arguments, the family's
Trainer) without evaluation; seconds per step are measured after the first ``--warmup`` steps.
Peak memory: ``torch.cuda.max_memory_allocated`` per job on CUDA; on CPU the process's peak
resident set (it only grows: a job's figure includes the jobs before it). bf16 runs only where the
device has native bf16, else (a CPU without AVX512-BF16 / AMX) it is forced and marked
``emulated``. The teacher of a cached KD job is loaded once per run; its cache build is not timed.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_overhead import StepClock, seconds_per_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (layers, hidden, heads, ffn) of the seed shapes and of their --tiny stand-ins
SHAPES = {
    "roberta-large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "tiny-bert": dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=2, intermediate_size=128),
    "tiny-gpt2": dict(n_layer=4, n_embd=64, n_head=2),
}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def timed(recipe: Any, warmup: int) -> dict[str, float]:
    """Train ``recipe`` through its family without evaluation: samples/s after ``warmup`` steps, peak memory."""
    from deltakd import api
    from deltakd.runs import new_run_dir

    recipe, fam = api.resolve_recipe(recipe)
    prep = fam.prepare(recipe)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    args = fam.arguments(prep, new_run_dir(recipe.output_dir, recipe.name), [])  # the family's own
    trainer = fam.make_trainer(prep, args, [clock])
    loss = trainer.train().training_loss
    s = seconds_per_step(clock.times, warmup)
    return {"samples_s": recipe.train.batch_size * args.world_size / s, "peak_mb": peak_memory_mb(), "loss": loss}


def bert_teacher_base(out: Path, shape: dict[str, int]) -> Path:
    """A random BERT of ``shape`` with MiniLM's tokenizer (30,522 tokens), saved to ``out``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from deltakd.models.hub import resolve_model_path

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm-l6"))
    BertModel(BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=512, **shape)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def sst2_folder(out: Path, rows: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lines = (ROOT / "data/sst2/train.tsv").read_text().splitlines()
    (out / "train.tsv").write_text("\n".join(lines[:rows + 1]) + "\n")
    (out / "dev.tsv").write_text("\n".join((ROOT / "data/sst2/dev.tsv").read_text().splitlines()[:129]) + "\n")
    return out


def pairs_file(out: Path, rows: int) -> Path:
    """Text pairs for a multistage stage (an SST-2 sentence and the same words reversed; speed only)."""
    lines = (ROOT / "data/sst2/train.tsv").read_text().splitlines()[1:rows + 1]
    sents = [ln.split("\t")[0] for ln in lines]
    out.write_text("".join(f"{s}\t{' '.join(reversed(s.split()))}\n" for s in sents), encoding="utf-8")
    return out


def lm_folder(out: Path, stories: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "data/tinystories/train.txt").read_text(encoding="utf-8").split("<|endoftext|>")
    text = [s.strip() for s in text if s.strip()]
    (out / "train.txt").write_text("<|endoftext|>".join(text[:stories]), encoding="utf-8")
    (out / "valid.txt").write_text("<|endoftext|>".join(text[stories:stories + 5]), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: the same code, in minutes")
    ap.add_argument("--steps", type=int, default=None, help="training steps per job (300; --tiny: 4)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (10; --tiny: 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="(32; --tiny: 8)")
    ap.add_argument("--length", type=int, default=None, help="max tokens per example (128; --tiny: 32)")
    a = ap.parse_args(argv)
    steps = a.steps or (4 if a.tiny else 300)
    warmup = min(a.warmup if a.warmup is not None else (1 if a.tiny else 10), steps - 1)
    bs = a.batch_size or (8 if a.tiny else 32)
    length = a.length or (32 if a.tiny else 128)
    bert, gpt = ("tiny-bert", "tiny-gpt2") if a.tiny else ("roberta-large", "gpt2")
    vocab = 400 if a.tiny else 8000

    from deltakd import api
    from deltakd.utils import native_bf16

    native, device = native_bf16()
    bf16 = True if native else "force"
    rows: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["DELTAKD_CACHE"] = str(tmp / "cache")
        train = {"max_steps": steps, "batch_size": bs, "eval_batch_size": 2 * bs, "logging_steps": max(1, steps // 5),
                 "eval_every": 10 ** 6, "save_optimizer": False}
        common = {"track": [], "output_dir": str(tmp / "runs")}

        def row(name: str, recipe: dict) -> dict[str, float]:
            rows[name] = timed(recipe, warmup)
            print(f"  {name}: {rows[name]['samples_s']:.1f} samples/s, peak {rows[name]['peak_mb']:.0f} MB", flush=True)
            return rows[name]

        # classification KD: the large teacher (LoRA) fine-tuned, then the 6-layer student live / cached, fp32 / bf16
        sst2 = sst2_folder(tmp / "sst2", bs * (steps + 2))
        task = {"name": "sst2", "data_dir": str(sst2), "max_length": length}
        base = bert_teacher_base(tmp / "teacher-base", SHAPES[bert])
        teacher = {**common, "name": "teacher", "task": task, "model": {"name": str(base)},
                   "peft": {"method": "lora", "r": 8, "alpha": 16, "target": ["query", "value"], "merge": True},
                   "train": {**train, "lr": 1e-4}}
        row(f"{bert} LoRA teacher", teacher)
        api.train({**teacher, "train": {**train, "max_steps": 1}})  # a finished run for the students
        layers = [0, 1] if a.tiny else [0, 4, 8, 12, 16, 20]

        def student(cache: bool, precision: bool | str) -> dict:
            return {**common, "name": "student", "task": task, "teacher": {"run": str(tmp / "runs" / "teacher"), "merged": True},
                    "student": {"from_teacher": {"layers": layers}}, "peft": {"method": "full"},
                    "distill": {"losses": {"ce": 0.5, "kd": 0.5}, "cache_teacher": cache},
                    "train": {**train, "lr": 5e-5, "bf16": precision}}

        for cache in (False, True):
            for precision in (False, bf16):
                row(f"KD {len(layers)}-layer student, {'cached' if cache else 'live'}, "
                    f"{'bf16' if precision else 'fp32'}", student(cache, precision))

        # multistage: one MSE stage from the packaged MiniLM-L6 sentence teacher
        row("multistage MiniLM-L6 stage", {
            **common, "family": "multistage", "name": "ms", "teacher": {"model": "minilm-l6"},
            "data": {"train": [str(pairs_file(tmp / "pairs.en-de.tsv", bs * (steps + 2)))], "heldout": 4,
                     "max_length": length},
            "train": {**train, "lr": 5e-5}})

        # dialogue LoRA on a DialoGPT-small-shaped GPT-2 (pre-trained from scratch first)
        gpt_cfg = {"model_type": "gpt2", "n_positions": max(64, 2 * length), **SHAPES[gpt]}
        dd = {"name": "dd", "data_dir": str(ROOT / "data/dailydialog_sample"), "max_length": length,
              "block_size": length, "dialogue": {"context_turns": 2, "max_response_tokens": 16, "max_dialogues": 60 if a.tiny else None}}
        pre = api.train({**common, "name": "pre", "task": {**dd, "kind": "lm"},
                         "model": {"config": gpt_cfg, "vocab_size": vocab}, "train": {**train, "max_steps": 2}})
        row(f"dialogue LoRA ({gpt}-shaped)", {
            **common, "name": "dlora", "task": {**dd, "kind": "dialogue"}, "model": {"name": str(tmp / "runs" / "pre")},
            "peft": {"method": "lora", "r": 8, "alpha": 16, "target": ["c_attn"]}, "train": {**train, "lr": 1e-3}})

        # partial_kd: the GPT-2-shaped teacher trained, then half its layers distilled
        lm = {"name": "stories", "kind": "lm", "data_dir": str(lm_folder(tmp / "lm", 40 if a.tiny else 400)),
              "train_file": "train.txt", "valid_file": "valid.txt", "block_size": length}
        lm_teacher = {**common, "name": "lmt", "task": lm, "model": {"config": gpt_cfg, "vocab_size": vocab},
                      "train": {**train, "lr": 3e-4}}
        row(f"partial_kd {gpt}-shaped teacher", lm_teacher)
        api.train({**lm_teacher, "train": {**train, "max_steps": 1}})
        row(f"partial_kd {gpt}-shaped, student {SHAPES[gpt]['n_layer'] // 2} layers", {
            **common, "name": "lmkd", "task": lm, "teacher": {"run": str(tmp / "runs" / "lmt")},
            "student": {"from_teacher": {"nb_layers": SHAPES[gpt]["n_layer"] // 2}},
            "distill": {"losses": {"ce": 0.5, "kd": 0.5}}, "train": {**train, "lr": 3e-4}})

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else device
    print(f"\n{name}: native bf16 {'yes' if native else 'no (bf16 forced: emulated)'}; {steps} steps per job "
          f"(first {warmup} not timed), batch {bs}, max length {length}, {time.perf_counter() - t0:.0f} s in all")
    print("| job | samples/s | peak memory (MB) | final loss |\n|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['samples_s']:.1f} | {v['peak_mb']:.0f} | {v['loss']:.4f} |")
    kd = f"KD {len(layers)}-layer student"
    ratios = {"bf16/fp32 (live)": rows[f"{kd}, live, bf16"]["samples_s"] / rows[f"{kd}, live, fp32"]["samples_s"],
              "bf16/fp32 (cached)": rows[f"{kd}, cached, bf16"]["samples_s"] / rows[f"{kd}, cached, fp32"]["samples_s"],
              "cached/live (fp32)": rows[f"{kd}, cached, fp32"]["samples_s"] / rows[f"{kd}, live, fp32"]["samples_s"],
              "cached/live (bf16)": rows[f"{kd}, cached, bf16"]["samples_s"] / rows[f"{kd}, live, bf16"]["samples_s"]}
    print("  ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    rows["ratios"] = ratios
    return rows


if __name__ == "__main__":
    main()
