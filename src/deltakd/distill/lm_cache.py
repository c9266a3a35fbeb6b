"""A sparse teacher cache for causal-LM distillation: per training token, the teacher's top-k.

For every position of every training block the frozen teacher's next-token distribution at the
recipe's temperature ``T`` is kept as its ``k`` most likely token ids, their log-probabilities and
the log of the mass outside them (the tail): what ``losses.lm_sparse`` compares the student with
(k + 1 buckets). Computed once over the LM training blocks, it serves every later student run
and sweep trial; the teacher then never runs during training.

Stored compactly and read through memory maps (``numpy.load(mmap_mode="r")``), one row per block:
``ids.npy`` (N, L, k) uint16 when the logit width fits 16 bits, else (N, L, k, 3) uint8 (3-byte
little-endian ids, up to 16.7M tokens); ``logp.npy`` (N, L, k) float16; ``tail.npy`` (N, L)
float16. Bytes per token: ``4k + 2`` with 16-bit ids (k = 64: 258), ``5k + 2`` with 3-byte ids
(k = 56: 282); ``meta.json`` records it.

Temperature: the values are ``log_softmax(z / T)`` at the recipe's ``T``, and ``T`` is part of the
key. Storing T = 1 values and rescaling would be wrong: the top-k log-probs at ``T`` follow from
those at 1 (``logp / T`` renormalised), but the tail mass at ``T`` depends on how the tail mass is
spread, which the cache does not keep. A run at another temperature builds its own entry.

The key hashes the teacher (class, config, every weight: ``cache.teacher_fingerprint``), the
tokenizer (``data.tokenize.tokenizer_fingerprint``), every training block's ids
(``cache.dataset_fingerprint``), the block layout (N, L), ``k``, ``T`` and the compared logit
width. Entries are built once, published atomically (``utils.cached_dir``: concurrent builders
take turns), and under torchrun the main process builds while the others wait (the caller wraps
this in ``main_process_first``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.tokenize import tokenizer_fingerprint
from ..losses import table
from ..utils import cache_root, cached_dir, text_digest
from .cache import dataset_fingerprint, teacher_fingerprint

FORMAT = "lm-topk-cache-v1"
_READY = "meta.json"  # written last: its presence marks a complete entry
_UINT16_MAX_WIDTH = 1 << 16
_UINT24_MAX_WIDTH = 1 << 24


def bytes_per_token(k: int, width: int) -> int:
    """Stored bytes per token: k ids (2 or 3 bytes), k float16 log-probs, one float16 tail."""
    return k * (id_bytes(width) + 2) + 2


def id_bytes(width: int) -> int:
    if width <= _UINT16_MAX_WIDTH:
        return 2
    if width <= _UINT24_MAX_WIDTH:
        return 3
    raise ValueError(f"lm teacher cache: {width} logits per token exceed 3-byte ids")


def pack_ids(ids: np.ndarray, width: int) -> np.ndarray:
    """Token ids (..., k) -> uint16 (..., k), or uint8 (..., k, 3) little-endian when ``width`` > 65536."""
    if id_bytes(width) == 2:
        return ids.astype(np.uint16)
    return ids.astype("<u4").view(np.uint8).reshape(*ids.shape, 4)[..., :3]


def unpack_ids(packed: np.ndarray) -> np.ndarray:
    """The inverse of :func:`pack_ids`: int64 ids (..., k)."""
    if packed.dtype == np.uint16:
        return packed.astype(np.int64)
    wide = np.zeros((*packed.shape[:-1], 4), dtype=np.uint8)
    wide[..., :3] = packed
    return wide.view("<u4")[..., 0].astype(np.int64)


@dataclass
class TopKTeacher:
    """One batch of the sparse teacher: ``ids`` (B, L, k) int64, ``logp`` (B, L, k) and ``tail`` (B, L)
    float32 log-probabilities at the cache's temperature; ``width``: the logit width they cover."""

    ids: Tensor
    logp: Tensor
    tail: Tensor
    width: int


class LMTeacherCache:
    """The memory-mapped arrays of one entry; row ``i`` for training block ``i``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.meta = json.loads((self.path / _READY).read_text())
        self.ids = np.load(self.path / "ids.npy", mmap_mode="r")
        self.logp = np.load(self.path / "logp.npy", mmap_mode="r")
        self.tail = np.load(self.path / "tail.npy", mmap_mode="r")
        self.k, self.width = int(self.meta["k"]), int(self.meta["width"])
        self.temperature = float(self.meta["temperature"])
        self.bytes_per_token = int(self.meta["bytes_per_token"])

    def __len__(self) -> int:
        return int(self.logp.shape[0])

    @staticmethod
    def serves(names: Iterable[str]) -> bool:
        """Whether every loss of ``names`` that reads the teacher can read it from this cache (the
        token-level hidden-state losses cannot: the teacher then runs live)."""
        return not table.live_only(names)

    def lookup(self, idx: Tensor, device: torch.device | str | None = None) -> TopKTeacher:
        """The rows of blocks ``idx`` (B,), as tensors on ``device``."""
        rows = idx.detach().cpu().long().numpy()
        ids = torch.from_numpy(unpack_ids(self.ids[rows]))  # (B, L, k)
        logp = torch.from_numpy(np.asarray(self.logp[rows], dtype=np.float32))  # (B, L, k)
        tail = torch.from_numpy(np.asarray(self.tail[rows], dtype=np.float32))  # (B, L)
        return TopKTeacher(ids.to(device), logp.to(device), tail.to(device), self.width)


@torch.no_grad()
def topk_logprobs(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """Logits (B, L, V) -> top-k ids (B, L, k), their log-probs at ``temperature`` (B, L, k) and the
    log of the rest (B, L) (a logsumexp over the other ``V - k``: exact even when the rest is tiny)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, L, V)
    top, ids = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)  # (B, L); -inf when k = V
    return ids, top, tail


def _half(x: Tensor) -> np.ndarray:
    """float16, with log-probs below float16's range kept finite (-inf only for an empty tail)."""
    return x.clamp_min(-65000.0).where(torch.isfinite(x), x).to(torch.float16).cpu().numpy()


def build_entry(out: Path, teacher: nn.Module, blocks: Any, k: int, temperature: float, width: int,
                batch_size: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Run the teacher over ``blocks`` (a dataset of equal-length ``input_ids``) in row order and write
    the three arrays and ``meta.json`` (last) into ``out``."""
    n, length = len(blocks), len(blocks[0]["input_ids"])
    ids = np.lib.format.open_memmap(out / "ids.npy", mode="w+", dtype=np.uint16 if id_bytes(width) == 2 else np.uint8,
                                    shape=(n, length, k) if id_bytes(width) == 2 else (n, length, k, 3))
    logp = np.lib.format.open_memmap(out / "logp.npy", mode="w+", dtype=np.float16, shape=(n, length, k))
    tail = np.lib.format.open_memmap(out / "tail.npy", mode="w+", dtype=np.float16, shape=(n, length))
    teacher.eval()
    for start in tqdm(range(0, n, batch_size), desc="caching teacher top-k", unit="batch"):
        stop = min(start + batch_size, n)
        batch = torch.tensor(blocks[start:stop]["input_ids"], dtype=torch.long, device=device)  # (B, L)
        with torch.no_grad():
            logits = teacher(input_ids=batch).logits[..., :width]  # (B, L, width)
        top_ids, top_logp, rest = topk_logprobs(logits, k, temperature)
        ids[start:stop] = pack_ids(top_ids.cpu().numpy(), width)
        logp[start:stop] = _half(top_logp)
        tail[start:stop] = _half(rest)
    for arr in (ids, logp, tail):
        arr.flush()
    del ids, logp, tail
    meta = {"format": FORMAT, "blocks": n, "block_size": length, "tokens": n * length, "k": k, "width": width,
            "temperature": temperature, "id_bytes": id_bytes(width), "value_dtype": "float16",
            "bytes_per_token": bytes_per_token(k, width), "teacher_class": type(teacher).__name__}
    (out / _READY).write_text(json.dumps(meta, indent=2))
    return meta


def load_or_build(teacher: nn.Module, blocks: Any, tokenizer: Any, k: int, temperature: float, width: int,
                  batch_size: int, device: torch.device | str = "cpu", root: Path | None = None) -> LMTeacherCache:
    """The entry for (teacher, tokenizer, blocks, layout, k, T, width): loaded when present, else built."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = min(int(k), int(width))
    layout = (len(blocks), len(blocks[0]["input_ids"]))
    key = text_digest(FORMAT, teacher_fingerprint(teacher), tokenizer_fingerprint(tokenizer),
                      dataset_fingerprint(blocks), layout, k, float(temperature), int(width))
    path = cached_dir((root or cache_root()) / "lm_teacher", key,
                      lambda tmp: build_entry(tmp, teacher, blocks, k, float(temperature), int(width), batch_size,
                                              device),
                      ready=_READY)
    cache = LMTeacherCache(path)
    if len(cache) != len(blocks):
        raise RuntimeError(f"lm teacher cache {path}: {len(cache)} rows for {len(blocks)} blocks")
    return cache
