"""Token-level teacher outputs on disk, for the per-token losses (``hidden_mse``, ``hidden_cos``,
``attention_kl``).

The per-example cache (``cache.py``) holds logits and mean-pooled layers; a loss comparing hidden
states token by token needs the teacher's (L, H) states of every mapped layer, an attention loss
its (A, L, L) maps. This cache holds exactly those: for the teacher layers the layer map can pick
(the pairs of a ``fixed`` / ``average`` map; every teacher layer for the random maps, which draw
from all of them), every real token's hidden state in one memory-mapped fp16 ``.npy`` array
(total_tokens, layers, H), example ``i``'s tokens at rows ``offsets[i]:offsets[i + 1]``, and (with
an attention loss) every real (query, key) pair's attention over the heads in another
(total_pairs, layers, A), example ``i``'s l_i x l_i pairs in a row; examples of different lengths
take no padding. The logits (N, C) are stored too, so the logit losses need no teacher either.

Its size is known before anything runs: tokens x layers x H x 2 bytes (+ sum of l_i^2 x layers x A x 2
with an attention loss, + the logits). Over the recipe's ``distill.cache_max_gb``, or over the free
disk space, it is not built: one warning line names the size and the budget and the run uses the
live teacher.

Keyed like the per-example cache (teacher weights and config, every tokenised example) plus the
layer set and the parts stored; built once (``utils.cached_dir``: atomic publish, concurrent
builders take turns). LoRA features (``lora_ild``) are not cached: that loss runs the teacher live.
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
_HIDDEN, _ATTN, _LOGITS, _OFFSETS, _META = "hidden.npy", "attentions.npy", "logits.npy", "offsets.npy", "meta.json"


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


def cache_bytes(lengths: np.ndarray, layers: int, hidden_size: int, heads: int, num_labels: int,
                hidden: bool = True, attentions: bool = False) -> int:
    """Bytes on disk: fp16 hidden states (tokens, layers, H), fp16 attentions (sum l_i^2, layers, A),
    fp16 logits (N, C), int64 offsets (N + 1)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    size = len(lengths) * num_labels * 2 + (len(lengths) + 1) * 8
    if hidden:
        size += int(lengths.sum()) * layers * hidden_size * 2
    if attentions:
        size += int((lengths**2).sum()) * layers * heads * 2
    return size


@dataclass
class TokenTeacherOutput:
    """What a live teacher output offers the losses: ``logits`` (B, C); ``hidden_states``, a tuple in
    the ``output_hidden_states`` layout (index ``j + 1``: layer ``j``), (B, L, H) for the cached layers
    and None for the others; ``attentions`` (index ``j``: layer ``j``), (B, A, L, L) likewise."""

    logits: Tensor
    hidden_states: tuple[Tensor | None, ...]
    attentions: tuple[Tensor | None, ...] | None = None


class TokenTeacherCache:
    """The token cache of one (teacher, tokenised dataset, layer set); rows by example index."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.meta = json.loads((self.path / _META).read_text())
        self.layers: tuple[int, ...] = tuple(self.meta["layers"])
        self.n_teacher_layers = int(self.meta["teacher_layers"])
        self.offsets = np.load(self.path / _OFFSETS)  # (N + 1,) int64
        lengths = np.diff(self.offsets)
        self.pair_offsets = np.concatenate([[0], np.cumsum(lengths**2)])  # (N + 1,): example i's l_i^2 pairs
        self.logits = torch.from_numpy(np.load(self.path / _LOGITS))  # (N, C) fp16
        # memory-mapped: read on demand, (T, K, H) / (sum l_i^2, K, A) fp16, or None when not stored
        self.hidden = np.load(self.path / _HIDDEN, mmap_mode="r") if self.meta["hidden_states"] else None
        self.attentions = np.load(self.path / _ATTN, mmap_mode="r") if self.meta["attentions"] else None

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @property
    def nbytes(self) -> int:
        parts = (self.hidden, self.attentions, self.offsets)
        return int(sum(p.nbytes for p in parts if p is not None) + self.logits.numel() * 2)

    @staticmethod
    def serves(names: Iterable[str]) -> bool:
        """Whether every loss of ``names`` that reads the teacher can read it from this cache."""
        return not table.token_live_only(names)

    def lookup_tokens(self, idx: Tensor, attention_mask: Tensor | None, device: torch.device | str | None = None,
                      hidden: bool = True, attentions: bool = False) -> TokenTeacherOutput:
        """The teacher's output for examples ``idx`` (B,) as the student's collator padded them, fp32:
        each example's tokens where ``attention_mask`` (B, L) is set (left or right padding alike), zeros
        at padded positions (which the losses mask out). ``hidden`` / ``attentions``: which to read."""
        rows = idx.detach().cpu().long().numpy()
        logits = self.logits.index_select(0, torch.from_numpy(rows)).float().to(device)  # (B, C)
        states: list[Tensor | None] = [None] * (self.n_teacher_layers + 1)
        maps: list[Tensor | None] = [None] * self.n_teacher_layers
        if not (hidden or attentions):
            return TokenTeacherOutput(logits, tuple(states), tuple(maps))
        if attention_mask is None:
            raise ValueError("token teacher cache: the batch has no attention_mask to place the tokens by")
        mask = attention_mask.to(device).bool()  # (B, L)
        counts = mask.sum(1).cpu().numpy()
        if not np.array_equal(counts, self.offsets[rows + 1] - self.offsets[rows]):
            raise RuntimeError(f"token teacher cache {self.path}: the batch's token counts {counts.tolist()} are "
                               f"not the cached examples' {np.diff(self.offsets)[rows].tolist()} "
                               "(tokenisation changed?)")
        if hidden:
            tokens = self._place(self.hidden, self.offsets, rows, mask, device)  # (B, L, K, H)
            for k, j in enumerate(self.layers):
                states[j + 1] = tokens[:, :, k]  # (B, L, H)
        if attentions:
            pairs = mask[:, :, None] & mask[:, None, :]  # (B, L, L): real (query, key) pairs
            att = self._place(self.attentions, self.pair_offsets, rows, pairs, device)  # (B, L, L, K, A)
            for k, j in enumerate(self.layers):
                maps[j] = att[:, :, :, k].permute(0, 3, 1, 2)  # (B, A, L, L)
        return TokenTeacherOutput(logits, tuple(states), tuple(maps))

    def _place(self, store: np.ndarray | None, offsets: np.ndarray, rows: np.ndarray, where: Tensor,
               device: Any) -> Tensor:
        """Rows ``offsets[r]:offsets[r + 1]`` of ``store`` for each example, scattered in order into the
        set positions of ``where`` (row-major: example by example, as they were taken out); fp32."""
        if store is None:
            raise RuntimeError(f"token teacher cache {self.path}: this part was not stored")
        flat = np.concatenate([store[offsets[r]:offsets[r + 1]] for r in rows])  # (n, K, X) fp16
        out = torch.zeros(*where.shape, *flat.shape[1:], device=device)
        out[where] = torch.from_numpy(flat).to(device).float()
        return out


@torch.no_grad()
def _build(tmp: Path, teacher: nn.Module, dataset: Any, collator: Any, batch_size: int, device: Any,
           layers: tuple[int, ...], n_teacher: int, lengths: np.ndarray, num_labels: int, hidden: bool,
           attentions: bool) -> None:
    """Run the frozen teacher over ``dataset`` (similar lengths batched together) and write the entry."""
    cfg = teacher.config
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    pair_offsets = np.concatenate([[0], np.cumsum(lengths**2)]).astype(np.int64)
    k = len(layers)
    states = open_memmap(tmp / _HIDDEN, mode="w+", dtype=np.float16,
                         shape=(int(offsets[-1]), k, int(cfg.hidden_size))) if hidden else None
    maps = open_memmap(tmp / _ATTN, mode="w+", dtype=np.float16,
                       shape=(int(pair_offsets[-1]), k, int(cfg.num_attention_heads))) if attentions else None
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
        batch = {key: v.to(device) for key, v in batch.items()}
        out = teacher(**batch, output_hidden_states=hidden, output_attentions=attentions)
        mask = batch["attention_mask"].bool()  # (B, L)
        if not np.array_equal(mask.sum(1).cpu().numpy(), lengths[rows]):
            raise RuntimeError("token teacher cache: the collator's attention mask does not cover each "
                               "example's tokens")
        if hidden:
            valid = torch.stack([out.hidden_states[j + 1] for j in layers], dim=2)[mask]  # (T_b, K, H), in order
            _scatter(states, offsets, rows, valid.to(torch.float16).cpu().numpy())
        if attentions:
            if out.attentions is None or any(a is None for a in out.attentions):
                raise RuntimeError("token teacher cache: the teacher returned no attention maps "
                                   "(eager attention needed)")
            att = torch.stack([out.attentions[j] for j in layers], dim=-1).permute(0, 2, 3, 4, 1)  # (B, L, L, K, A)
            _scatter(maps, pair_offsets, rows, att[mask[:, :, None] & mask[:, None, :]].to(torch.float16).cpu().numpy())
        logits[rows] = out.logits.to(torch.float16).cpu().numpy()
    for store in (states, maps):
        if store is not None:
            store.flush()
    del states, maps
    np.save(tmp / _LOGITS, logits)
    np.save(tmp / _OFFSETS, offsets)
    (tmp / _META).write_text(json.dumps({
        "format": FORMAT, "examples": len(lengths), "tokens": int(offsets[-1]), "layers": list(layers),
        "hidden_states": hidden, "attentions": attentions, "teacher_layers": n_teacher,
        "hidden": int(cfg.hidden_size), "heads": int(cfg.num_attention_heads), "num_labels": num_labels,
        "dtype": "float16", "teacher_class": type(teacher).__name__}, indent=2))


def _scatter(store: np.ndarray, offsets: np.ndarray, rows: np.ndarray, valid: np.ndarray) -> None:
    """Example ``rows[b]``'s block of ``valid`` (the blocks back to back, in batch order) to its rows."""
    at = 0
    for r in rows:
        n = int(offsets[r + 1] - offsets[r])
        store[offsets[r]:offsets[r] + n] = valid[at:at + n]
        at += n


def _free_bytes(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def load_or_build(teacher: nn.Module, dataset: Any, collator: Any, batch_size: int, layer_map: LayerMap | None,
                  num_labels: int, max_gb: float, device: torch.device | str = "cpu", root: Path | None = None,
                  hidden: bool = True, attentions: bool = False) -> TokenTeacherCache | None:
    """The token cache entry for (teacher, dataset, the map's layers, the parts ``hidden`` / ``attentions``),
    loaded or built; None (after one warning line) when its size is over ``max_gb`` (10^9 bytes) or over
    the free disk space."""
    if layer_map is None:
        raise ValueError("the token teacher cache holds the layers of a layer map; there is none")
    layers = cache_layers(layer_map)
    lengths = example_lengths(dataset)
    cfg = teacher.config
    size = cache_bytes(lengths, len(layers), int(cfg.hidden_size), int(cfg.num_attention_heads), num_labels,
                       hidden, attentions)
    parts = [f"{int(lengths.sum())} tokens x {len(layers)} layers x {cfg.hidden_size}"] if hidden else []
    if attentions:
        parts.append(f"{int((lengths**2).sum())} token pairs x {len(layers)} layers x {cfg.num_attention_heads} heads")
    what = " + ".join(parts) + ", 2 bytes each"
    folder = (root or cache_root()) / "teacher-tokens"
    if size > max_gb * GB:
        warning(__name__, "teacher token cache: %.3g GB (%s) is over distill.cache_max_gb %.3g GB; "
                "the teacher runs live every step", size / GB, what, max_gb)
        return None
    key = text_digest(FORMAT, teacher_fingerprint(teacher), dataset_fingerprint(dataset), list(layers), hidden,
                      attentions)
    if not (folder / key / _META).is_file() and size > _free_bytes(folder):
        warning(__name__, "teacher token cache: %.3g GB (%s) is over the %.3g GB free in %s; "
                "the teacher runs live every step", size / GB, what, _free_bytes(folder) / GB, folder)
        return None
    path = cached_dir(folder, key, lambda tmp: _build(tmp, teacher, dataset, collator, batch_size, device, layers,
                                                       layer_map.n_teacher, lengths, num_labels, hidden, attentions),
                      ready=_META)
    cache = TokenTeacherCache(path)
    if len(cache) != len(dataset) or cache.layers != layers:
        raise RuntimeError(f"token teacher cache {path}: {len(cache)} rows, layers {cache.layers}, "
                           f"for {len(dataset)} examples, layers {layers}")
    return cache
