"""Peak memory and time of one causal-LM KD loss step: full logits vs chunked vs fused.

One forward + backward of each token loss (forward KL ``kd``, reverse KL ``reverse_kl``, ``jsd``
at beta 0.5, cross-entropy ``ce``) on ``--tokens`` valid tokens, a student and a teacher with
random final hidden states (tokens, ``--hidden``) and random linear LM heads (vocab, hidden), at
each vocabulary size, three ways:

- ``naive``: both heads applied to all tokens (full (tokens, vocab) logits, the teacher's under
  ``no_grad``), then ``deltakd.losses.lm`` on them (what the trainer does without ``chunked``);
- ``chunked``: ``losses.lm_chunked.fused_lm_losses(method="checkpoint")``: per chunk of tokens the
  heads and the ``losses.lm`` functions under ``torch.utils.checkpoint`` (recomputed in backward);
- ``fused``: ``fused_lm_losses(method="fused")`` (the trainer's): per chunk the heads and the
  closed-form gradients in one ``autograd.Function``, nothing recomputed.

Chunks: ``--chunk-tokens`` (default ``lm_chunked.default_chunk_tokens``: about 32M logits).

What is measured, per case in a fresh process (forked from this one before any torch compute):

- on CPU, the process's peak resident memory during the step minus its resident memory before:
  the peak mark is reset just before the step (``/proc/self/clear_refs`` 5; the peak is ``VmHWM``
  of ``/proc/self/status``; where that is not writable, ``getrusage`` ``ru_maxrss``, whose mark a
  forked process inherits); the inputs and weights and the code a step runs (a tiny warm-up step
  of the same way first) are resident before; what the step adds on top of them at its highest
  is the figure (every byte the step touches, the allocator's included, not only live tensors);
- on CUDA (``--device cuda``), ``torch.cuda.max_memory_allocated()`` during the step minus the
  memory allocated before it: live tensor bytes at their highest;
- time: wall time of the forward + backward (``--repeats`` runs after the first, the fastest;
  with ``--repeats 0`` the first run alone, as in the default).

    OMP_NUM_THREADS=1 python benchmarks/lm_kd_memory.py                # 32k, 128k, 152k; 4,096 tokens; hidden 256
    python benchmarks/lm_kd_memory.py --smoke                           # small sizes, seconds

A case killed by the kernel for memory (naive at large vocabularies on a small machine) shows as
``-``, like a way left out with ``--ways``.

Prints one row per loss and vocabulary: peak MiB and seconds of each way, and chunked / naive and
fused / naive memory and time. Targets (issue 18): chunked or fused peak <= 0.15x naive at the
128k vocabulary, time <= 1.1x naive.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

LOSSES = ("kd", "reverse_kl", "jsd", "ce")
WAYS = ("naive", "chunked", "fused")
FULL = {"vocabs": (32_000, 128_000, 152_000), "tokens": 4096, "hidden": 256, "chunk_tokens": None}
SMOKE = {"vocabs": (16_384,), "tokens": 1024, "hidden": 32, "chunk_tokens": 32}
TEMPERATURE, BETA = 2.0, 0.5


def _inputs(vocab: int, tokens: int, hidden: int, device: str):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    scale = hidden**-0.5

    def randn(*shape, grad=False):
        x = torch.randn(*shape, generator=g).mul_(scale if len(shape) == 2 and shape[0] == vocab else 1.0)
        return x.to(device).requires_grad_(grad)

    return (randn(tokens, hidden, grad=True), randn(vocab, hidden, grad=True), randn(tokens, hidden),
            randn(vocab, hidden), torch.randint(0, vocab, (tokens,), generator=g).to(device))


def _step(loss: str, way: str, h, w, th, tw, y, chunk_tokens: int | None) -> None:
    import torch
    import torch.nn.functional as F

    from deltakd.losses import lm
    from deltakd.losses.lm_chunked import LinearHead, fused_lm_losses

    if way == "naive":
        z = F.linear(h, w)[None]  # (1, N, V)
        with torch.no_grad():
            zt = F.linear(th, tw)[None] if loss != "ce" else None  # (1, N, V)
        if loss == "ce":
            value = lm.lm_ce(z, y[None], shift=False)
        elif loss == "kd":
            value = lm.token_kl(z, zt, TEMPERATURE)
        elif loss == "reverse_kl":
            value = lm.token_kl(z, zt, TEMPERATURE, reverse=True)
        else:
            value = lm.generalized_jsd(z, zt, BETA, TEMPERATURE)
        del z, zt
    else:
        value, _ = fused_lm_losses(h, LinearHead(w), y, {loss: 1.0}, teacher_hidden=th, teacher_head=LinearHead(tw),
                                   temperature=TEMPERATURE, beta=BETA, chunk_tokens=chunk_tokens,
                                   method="fused" if way == "fused" else "checkpoint")
    value.backward()
    h.grad = w.grad = None


def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def _reset_peak() -> int:
    """Reset the peak resident mark to the current resident memory; the baseline (KiB)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _rss_kib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _peak_kib() -> int:
    try:
        return _rss_kib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _case(loss: str, way: str, vocab: int, tokens: int, hidden: int, chunk_tokens: int | None, device: str,
          repeats: int, out) -> None:
    """In a forked process: one case; sends (peak MiB, seconds)."""
    import torch

    _step(loss, way, *_inputs(256, 16, hidden, device), 4)  # warm-up: code paged in, lazy imports done
    args = _inputs(vocab, tokens, hidden, device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak()
    times = []
    for _ in range(1 + repeats):
        t0 = time.perf_counter()
        _step(loss, way, *args, chunk_tokens)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (_peak_kib() - base) / 1024
    out.send((peak, min(times[1:]) if repeats else times[0]))
    out.close()


def measure(loss: str, way: str, vocab: int, tokens: int, hidden: int, chunk_tokens: int | None,
            device: str = "cpu", repeats: int = 0) -> tuple[float, float] | None:
    """(peak MiB, seconds) of one case, in a forked process; None when it was killed (out of memory)."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_case, args=(loss, way, vocab, tokens, hidden, chunk_tokens, device, repeats, send))
    proc.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:
        result = None
    proc.join()
    if result is None and proc.exitcode == -9:
        return None  # the kernel's out-of-memory killer
    if result is None or proc.exitcode != 0:
        raise RuntimeError(f"{loss} {way} vocab {vocab}: the measuring process ended with code {proc.exitcode}")
    return result


def _cells(pair: tuple[float, float] | None, widths: tuple[int, int], digits: tuple[int, int]) -> str:
    if pair is None:
        return f"{'-':>{widths[0]}}{'-':>{widths[1]}}"
    return f"{pair[0]:{widths[0]}.{digits[0]}f}{pair[1]:{widths[1]}.{digits[1]}f}"


def run(vocabs, tokens: int, hidden: int, chunk_tokens: int | None, losses=LOSSES, device: str = "cpu",
        repeats: int = 0, ways=WAYS, echo=print) -> list[dict]:
    """One row per vocabulary and loss; a way not run (``ways``) or killed for memory shows as ``-``."""
    import deltakd.losses.lm_chunked  # noqa: F401  imported once here, used by every forked case (no compute before the fork)

    rows = []
    echo(f"{tokens} tokens, hidden {hidden}, chunk tokens {chunk_tokens or 'default'}, device {device}, "
         f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    head = f"{'loss':<11}{'vocab':>8} | " + " | ".join(f"{w + ' MiB':>12}{'s':>7}" for w in WAYS)
    echo(head + f" | {'chunked/naive mem':>17}{'time':>6} | {'fused/naive mem':>15}{'time':>6}")
    for vocab in vocabs:
        for loss in losses:
            row = {"loss": loss, "vocab": vocab}
            for way in WAYS:
                row[way] = measure(loss, way, vocab, tokens, hidden, chunk_tokens, device, repeats) if way in ways else None
            for way in ("chunked", "fused"):
                naive, own = row["naive"], row[way]
                row[f"{way}_ratio"] = None if naive is None or own is None else (
                    own[0] / naive[0] if naive[0] > 0 else float("nan"), own[1] / naive[1])
            rows.append(row)
            cells = " | ".join(_cells(row[w], (12, 7), (1, 2)) for w in WAYS)
            echo(f"{loss:<11}{vocab:>8} | {cells} | {_cells(row['chunked_ratio'], (17, 6), (3, 2))}"
                 f" | {_cells(row['fused_ratio'], (15, 6), (3, 2))}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="small sizes: runs in seconds")
    p.add_argument("--vocabs", type=int, nargs="+")
    p.add_argument("--tokens", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--chunk-tokens", type=int)
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=0, help="timed runs after the first (default: the first alone)")
    p.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS), help="the ways to run (others show as -)")
    a = p.parse_args(argv)
    preset = SMOKE if a.smoke else FULL
    return run(a.vocabs or preset["vocabs"], a.tokens or preset["tokens"], a.hidden or preset["hidden"],
               a.chunk_tokens or preset["chunk_tokens"], tuple(a.losses), a.device, a.repeats, tuple(a.ways))


if __name__ == "__main__":
    main()
