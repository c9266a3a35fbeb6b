"""Token-level teacher outputs on disk, for the hidden-state losses (``hidden_mse``, ``hidden_cos``).

The per-example cache (``cache.py``) holds logits and mean-pooled layers; a loss comparing hidden
states token by token needs the teacher's (L, H) states of every mapped layer. This cache holds
exactly those: for the teacher layers the layer map can pick (the pairs of a ``fixed`` / ``average``
map; every teacher layer for the random maps, which draw from all of them), every real token's
hidden state, in fp16, in one memory-mapped ``.npy`` array of shape (total_tokens, layers, H):
example ``i``'s tokens are rows ``offsets[i]:offsets[i + 1]``, so examples of different lengths
take no padding. The logits (N, C) are stored too, so the logit losses need no teacher either.

Its size is known before anything runs: tokens x layers x H x 2 bytes (+ the logits). Over the
recipe's ``distill.cache_max_gb``, or over the free disk space, it is not built: one warning line
names the size and the budget and the run uses the live teacher.

Keyed like the per-example cache (teacher weights and config, every tokenised example) plus the
layer set; built once (``utils.cached_dir``: atomic publish, concurrent builders take turns).
Attention maps are not cached (``attention_kl`` runs the teacher live): heads x L x L per example
and layer is, for MiniLM-L6 at length 64 over SST-2's 67k sentences and 3 layers, about 20 GB.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..losses import table
from ..utils import cache_root, cached_dir, text_digest, warning
from .cache import _INPUT_COLUMNS, dataset_fingerprint, teacher_fingerprint
from .layer_map import LayerMap

FORMAT = "teacher-token-cache-v1"
GB = 10**9
_HIDDEN, _LOGITS, _OFFSETS, _META = "hidden.npy", "logits.npy", "offsets.npy", "meta.json"


def cache_layers(layer_map: LayerMap | None) -> tuple[int, ...]:
    """The teacher layers (0-based blocks) the map can ever pick: every one for the random maps."""
    if layer_map is None:
        return ()
    if layer_map.is_random:
        return tuple(range(layer_map.n_teacher))
    return tuple(sorted({j for _, js in layer_map.pairs for j in js}))


def example_lengths(dataset: Any) -> np.ndarray:
    """Each tokenised example's number of tokens (N,), in row order."""
    return np.fromiter((len(ids) for ids in dataset["input_ids"]), dtype=np.int64, count=len(dataset))


def cache_bytes(tokens: int, examples: int, layers: int, hidden: int, num_labels: int) -> int:
    """Bytes on disk: fp16 hidden states (tokens, layers, H), fp16 logits (N, C), int64 offsets (N + 1)."""
    return tokens * layers * hidden * 2 + examples * num_labels * 2 + (examples + 1) * 8


@dataclass
class TokenTeacherOutput:
    """What a live teacher output offers the losses: ``logits`` (B, C) and ``hidden_states``, a tuple
    in the ``output_hidden_states`` layout (index ``j + 1``: layer ``j``), (B, L, H) for the cached
    layers and None for the others."""

    logits: Tensor
    hidden_states: tuple[Tensor | None, ...]
    attentions: None = None


class TokenTeacherCache:
    """The token cache of one (teacher, tokenised dataset, layer set); rows by example index."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.meta = json.loads((self.path / _META).read_text())
        self.layers: tuple[int, ...] = tuple(self.meta["layers"])
        self.n_teacher_layers = int(self.meta["teacher_layers"])
        self.hidden = np.load(self.path / _HIDDEN, mmap_mode="r")  # (T, K, H) fp16, read on demand
        self.offsets = np.load(self.path / _OFFSETS)  # (N + 1,) int64
        self.logits = torch.from_numpy(np.load(self.path / _LOGITS))  # (N, C) fp16

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.hidden.nbytes + self.logits.numel() * 2 + self.offsets.nbytes)

    @staticmethod
    def serves(names: Iterable[str]) -> bool:
        """Whether every loss of ``names`` that reads the teacher can read it from this cache."""
        return not table.token_live_only(names)

    def lookup_tokens(self, idx: Tensor, attention_mask: Tensor | None, device: torch.device | str | None = None,
                      states: bool = True) -> TokenTeacherOutput:
        """The teacher's output for examples ``idx`` (B,) as the student's collator padded them:
        hidden states (B, L, H) with each example's tokens where ``attention_mask`` (B, L) is set (left
        or right padding alike) and zeros at padded positions (which the losses mask out), fp32.
        ``states`` False: the logits alone (no loss of this step reads hidden states)."""
        rows = idx.detach().cpu().long().numpy()
        logits = self.logits.index_select(0, torch.from_numpy(rows)).float().to(device)  # (B, C)
        if not states:
            return TokenTeacherOutput(logits, (None,) * (self.n_teacher_layers + 1))
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        if attention_mask is None:
            raise ValueError("token teacher cache: the batch has no attention_mask to place the tokens by")
        mask = attention_mask.to(device).bool()  # (B, L)
        counts = mask.sum(1).cpu().numpy()
        if not np.array_equal(counts, ends - starts):
            raise RuntimeError(f"token teacher cache {self.path}: the batch's token counts {counts.tolist()} are "
                               f"not the cached examples' {(ends - starts).tolist()} (tokenisation changed?)")
        flat = np.concatenate([self.hidden[s:e] for s, e in zip(starts, ends)])  # (T_b, K, H) fp16
        tokens = torch.zeros(*mask.shape, *flat.shape[1:], device=device)  # (B, L, K, H) fp32
        tokens[mask] = torch.from_numpy(flat).to(device).float()  # row-major: example by example, in order
        hidden: list[Tensor | None] = [None] * (self.n_teacher_layers + 1)
        for k, j in enumerate(self.layers):
            hidden[j + 1] = tokens[:, :, k]  # (B, L, H)
        return TokenTeacherOutput(logits, tuple(hidden))


@torch.no_grad()
def _build(tmp: Path, teacher: nn.Module, dataset: Any, collator: Any, batch_size: int, device: Any,
           layers: tuple[int, ...], n_teacher: int, lengths: np.ndarray, num_labels: int) -> None:
    """Run the frozen teacher over ``dataset`` (similar lengths batched together) and write the entry."""
    hidden_size = int(teacher.config.hidden_size)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    store = open_memmap(tmp / _HIDDEN, mode="w+", dtype=np.float16, shape=(int(offsets[-1]), len(layers), hidden_size))
    logits = np.zeros((len(lengths), num_labels), dtype=np.float16)
    order = np.argsort(lengths, kind="stable")
    cols = [c for c in _INPUT_COLUMNS if c in dataset.column_names]
    loader = DataLoader(dataset.select_columns(cols).select(order.tolist()), batch_size=batch_size, shuffle=False,
                        collate_fn=collator)
    teacher.eval()
    done = 0
    for batch in tqdm(loader, desc="caching teacher token states", unit="batch"):
        rows = order[done:done + len(batch["input_ids"])]
        done += len(rows)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = teacher(**batch, output_hidden_states=True)
        mask = batch["attention_mask"].bool()  # (B, L)
        if not np.array_equal(mask.sum(1).cpu().numpy(), lengths[rows]):
            raise RuntimeError("token teacher cache: the collator's attention mask does not cover each example's tokens")
        states = torch.stack([out.hidden_states[j + 1] for j in layers], dim=2)  # (B, L, K, H)
        valid = states[mask].to(torch.float16).cpu().numpy()  # (T_b, K, H), example by example
        at = 0
        for r in rows:
            n = int(lengths[r])
            store[offsets[r]:offsets[r] + n] = valid[at:at + n]
            at += n
        logits[rows] = out.logits.to(torch.float16).cpu().numpy()
    store.flush()
    del store
    np.save(tmp / _LOGITS, logits)
    np.save(tmp / _OFFSETS, offsets)
    (tmp / _META).write_text(json.dumps({
        "format": FORMAT, "examples": len(lengths), "tokens": int(offsets[-1]), "layers": list(layers),
        "teacher_layers": n_teacher, "hidden": hidden_size, "num_labels": num_labels,
        "dtype": "float16", "teacher_class": type(teacher).__name__}, indent=2))


def _free_bytes(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def load_or_build(teacher: nn.Module, dataset: Any, collator: Any, batch_size: int, layer_map: LayerMap | None,
                  num_labels: int, max_gb: float, device: torch.device | str = "cpu", root: Path | None = None
                  ) -> TokenTeacherCache | None:
    """The token cache entry for (teacher, dataset, the map's layers), loaded or built; None (after one
    warning line) when its size is over ``max_gb`` (10^9 bytes) or over the free disk space."""
    if layer_map is None:
        raise ValueError("the token teacher cache holds the layers of a layer map; there is none")
    layers = cache_layers(layer_map)
    lengths = example_lengths(dataset)
    size = cache_bytes(int(lengths.sum()), len(lengths), len(layers), int(teacher.config.hidden_size), num_labels)
    folder = (root or cache_root()) / "teacher-tokens"
    what = f"{int(lengths.sum())} tokens x {len(layers)} layers x {teacher.config.hidden_size} x 2 bytes"
    if size > max_gb * GB:
        warning(__name__, "teacher token cache: %.3g GB (%s) is over distill.cache_max_gb %.3g GB; "
                "the teacher runs live every step", size / GB, what, max_gb)
        return None
    key = text_digest(FORMAT, teacher_fingerprint(teacher), dataset_fingerprint(dataset), list(layers))
    if not (folder / key / _META).is_file() and size > _free_bytes(folder):
        warning(__name__, "teacher token cache: %.3g GB (%s) is over the %.3g GB free in %s; "
                "the teacher runs live every step", size / GB, what, _free_bytes(folder) / GB, folder)
        return None
    path = cached_dir(folder, key, lambda tmp: _build(tmp, teacher, dataset, collator, batch_size, device, layers,
                                                       layer_map.n_teacher, lengths, num_labels), ready=_META)
    cache = TokenTeacherCache(path)
    if len(cache) != len(dataset) or cache.layers != layers:
        raise RuntimeError(f"token teacher cache {path}: {len(cache)} rows, layers {cache.layers}, "
                           f"for {len(dataset)} examples, layers {layers}")
    return cache
