"""Training-step time, live dense KD vs cached top-k KD, alternating step by step on the same batches.

    OMP_NUM_THREADS=1 python benchmarks/lm_cache_steps.py TEACHER_MODEL_DIR CACHE_ENTRY_DIR BLOCKS_DIR [ROUNDS]

The partial_kd student (teacher layers 0 and 2), batch 16 x 128, loss 0.5 ce + 0.5 kd at T = 1,
AdamW: one step of each per round, in alternating order, so that a shared machine's load falls on
both alike. CACHE_ENTRY_DIR: an ``lm_teacher/<key>`` folder of ``DELTAKD_CACHE`` (built by a run of
recipes/partial_kd/student_kd_cached.yaml); BLOCKS_DIR: the ``lm_blocks/<key>`` training blocks it covers.
"""
import statistics
import sys
import time

import datasets
import torch
from transformers import AutoModelForCausalLM

from deltakd.distill.lm_cache import LMTeacherCache
from deltakd.losses import lm, lm_sparse
from deltakd.models.student import student_from_teacher

torch.manual_seed(0)
teacher = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
for p in teacher.parameters():
    p.requires_grad_(False)
cache = LMTeacherCache(sys.argv[2])
train = datasets.load_from_disk(sys.argv[3])
assert len(train) == len(cache), "the blocks the cache entry was built over"
students = {m: student_from_teacher(teacher, [0, 2]).train() for m in ("live", "cached")}
opts = {m: torch.optim.AdamW(s.parameters(), lr=1e-3) for m, s in students.items()}

def step(mode, idx):
    s, opt = students[mode], opts[mode]
    x = torch.tensor(train[idx.tolist()]["input_ids"])
    t0 = time.perf_counter()
    out = s(input_ids=x, labels=x)
    mask = lm.next_token_mask(x)
    if mode == "live":
        with torch.no_grad():
            t = teacher(input_ids=x).logits
        kd = lm.token_kl(out.logits, t, 1.0, mask)
    else:
        c = cache.lookup(idx)
        kd = lm_sparse.sparse_token_kl(out.logits[..., :c.width], c.ids, c.logp, c.tail, 1.0, mask)
    loss = 0.5 * out.loss + 0.5 * kd
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, float(kd.detach())

n = int(sys.argv[4]) if len(sys.argv) > 4 else 10
times = {"live": [], "cached": []}
g = torch.Generator().manual_seed(0)
for i in range(n + 1):
    idx = torch.randperm(len(train), generator=g)[:16]
    order = ("live", "cached") if i % 2 else ("cached", "live")
    kds = {}
    for m in order:
        dt, kds[m] = step(m, idx)
        if i:  # the first round warms up
            times[m].append(dt)
    print(f"round {i}: " + "  ".join(f"{m} {times[m][-1] if i else dt:.2f}s kd {kds[m]:.4f}" for m in ("live", "cached")), flush=True)
med = {m: statistics.median(v) for m, v in times.items()}
print(f"median step: live {med['live']:.3f}s, cached {med['cached']:.3f}s; tokens/s ratio cached/live "
      f"{med['live'] / med['cached']:.2f}x (per-round ratios {[round(a / b, 2) for a, b in zip(times['live'], times['cached'])]})")
