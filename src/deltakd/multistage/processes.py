"""The multistage family under several processes (torchrun): who writes, and in-batch negatives
from every process.

- ``is_main_process`` / ``main_process_first``: the run's files are written by the main process
  (the lifecycle calls ``save_model`` / ``finish`` there only; ``save_model`` checks again); the
  teacher-embedding cache is built by the main process of each machine while the others wait at a
  barrier, then read by all (``utils.cached_dir``'s lock still covers two machines sharing a disk).
- ``gather_rows``: every process's rows of a (B, H) tensor, in rank order, with the gradient
  flowing back to each process's own rows (``torch.distributed.nn.functional.all_gather``, whose
  backward sums what every process computed for them). The contrastive losses (MCL, CE, bool) are
  computed by every process on the gathered global batch: the value is the one-process value of
  that batch, and after DDP averages the parameter gradients over ``W`` processes (each holding
  ``W`` times its rows' share, from the backward's sum) the gradient is the one-process gradient.

- ``from_main`` / ``wait_for_everyone``: ``deltakd pipeline`` under torchrun: every process goes
  on to the next stage with the results the main process wrote (the others' lifecycle returns none).

Outside torchrun (no process group) all of this is the single-process behaviour.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["from_main", "gather_rows", "is_main_process", "main_process_first", "mean_over_processes",
           "wait_for_everyone", "world"]


def world() -> tuple[int, int]:
    """(rank, number of processes) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world()[0] == 0


def _local_main() -> bool:
    rank, _ = world()
    return int(os.environ.get("LOCAL_RANK", rank)) == 0


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The block runs on each machine's main process first, then on the others (a barrier between):
    what the first builds (a cache entry), the others read. One process: just the block."""
    _, size = world()
    first = _local_main()
    if size > 1 and not first:
        dist.barrier()
    yield
    if size > 1 and first:
        dist.barrier()


def wait_for_everyone() -> None:
    """A barrier (what the main process wrote is there for all after it); nothing on one process."""
    if world()[1] > 1:
        dist.barrier()


def from_main(value: Any) -> Any:
    """The main process's ``value`` (any picklable object) on every process; waits for the main one."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(x: Tensor) -> Tensor:
    """``(B_r, ...)`` on process ``r`` -> ``(sum_r B_r, ...)``, rows of every process in rank order,
    differentiable (the backward sums every process's gradient for this process's rows). Processes
    may hold different numbers of rows (padded for the collective, cut after). One process: ``x``."""
    _, size = world()
    if size == 1:
        return x
    count = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    rows = [int(c) for c in counts]
    most = max(rows)
    padded = x if x.shape[0] == most else F.pad(x, (0, 0) * (x.dim() - 1) + (0, most - x.shape[0]))
    from torch.distributed.nn import functional as dist_nn

    with warnings.catch_warnings():  # its suggested successor is a private module
        warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
        parts = dist_nn.all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, rows)])


def mean_over_processes(value: Tensor) -> Tensor:
    """A detached scalar averaged over the processes (for logging what each computed on its rows)."""
    _, size = world()
    out = value.detach().clone()
    if size > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= size
    return out
