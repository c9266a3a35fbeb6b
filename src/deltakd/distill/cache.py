"""Teacher outputs on disk: computed once per (teacher, data, tokenisation), reused by every student.

A frozen teacher in eval mode is a deterministic function of its input ids, so its logits and
the mean-pooled output of every layer can be stored once and looked up by example index.
The cache key hashes the teacher's weights and config (adapter or merged give different
weights, hence different keys) and every tokenised training example (ids, segments, mask), so a
changed teacher, data file, tokenizer or ``max_length`` builds a new entry. Stored in fp16
(safetensors); entries are published atomically, so a killed build leaves no half entry, and
concurrent builders of one entry take turns (``utils.cached_dir``): it is computed once.

What cannot come from this cache: token-level teacher states (hidden-state MSE/cosine per token,
attention maps, LoRA features). Hidden states and attention maps per token have their own cache
(``token_cache.py``); a loss needing LoRA features runs the teacher live.
Augmentation: deltakd feeds the student exactly the tokenised examples the cache saw (no input
augmentation); a recipe that changes inputs changes the key, and dropout lives only in the
student, which the teacher's outputs do not depend on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..losses import table
from ..losses.hidden import mean_pool
from ..utils import cache_root, cached_dir, text_digest

FORMAT = "teacher-cache-v1"
INDEX = "idx"  # the column that carries each training example's row number to the trainer
_FILE = "teacher.safetensors"
_INPUT_COLUMNS = ("input_ids", "token_type_ids", "attention_mask")


def teacher_fingerprint(model: nn.Module) -> str:
    """Hash of the model's class, config and every weight (bytes), in state-dict order."""
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(dataset: Any) -> str:
    """Hash of every tokenised example's input columns (ids, segments, mask), in row order."""
    h = hashlib.sha256()
    for col in _INPUT_COLUMNS:
        if col not in dataset.column_names:
            continue
        h.update(col.encode())
        for row in dataset[col]:
            h.update(np.asarray(row, dtype=np.int64).tobytes())
            h.update(b"|")
    return h.hexdigest()


@dataclass
class TeacherCache:
    """Cached teacher outputs for one tokenised dataset, row ``i`` for example ``i``.

    ``logits`` (N, C) and ``pooled`` (N, n_layers + 1, H): index 0 is the embedding output, index
    ``l + 1`` the mean-pooled output of transformer layer ``l`` (the ``hidden_states`` layout).
    """

    logits: Tensor
    pooled: Tensor
    path: Path

    def lookup(self, idx: Tensor, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """fp32 (B, C) logits and (B, n_layers + 1, H) pooled states for example indices ``idx`` (B,)."""
        rows = idx.detach().cpu().long()
        logits = self.logits.index_select(0, rows).float()  # (B, C)
        pooled = self.pooled.index_select(0, rows).float()  # (B, n_layers + 1, H)
        return logits.to(device), pooled.to(device)

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @staticmethod
    def serves(names: Iterable[str]) -> bool:
        """Whether every loss of ``names`` that reads the teacher can read it from this cache."""
        return not table.live_only(names)


@torch.no_grad()
def compute_teacher_outputs(teacher: nn.Module, dataset: Any, collator: Any, batch_size: int,
                            device: torch.device | str = "cpu", desc: str = "caching teacher outputs"
                            ) -> tuple[Tensor, Tensor]:
    """Run the frozen teacher over ``dataset`` in row order: fp16 logits (N, C), pooled (N, n+1, H)."""
    cols = [c for c in _INPUT_COLUMNS if c in dataset.column_names]
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)  # similar lengths together: little padding
    rows = dataset.select_columns(cols).select(order)
    loader = DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collator)
    teacher.eval()
    all_logits, all_pooled = [], []
    for batch in tqdm(loader, desc=desc, unit="batch"):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = teacher(**batch, output_hidden_states=True)
        mask = batch["attention_mask"]  # (B, L)
        pooled = torch.stack([mean_pool(h, mask) for h in out.hidden_states], dim=1)  # (B, n+1, H)
        all_logits.append(out.logits.to(torch.float16).cpu())
        all_pooled.append(pooled.to(torch.float16).cpu())
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # row i of the output is example i
    return torch.cat(all_logits)[back], torch.cat(all_pooled)[back]


def load_or_build(teacher: nn.Module, dataset: Any, collator: Any, batch_size: int,
                  device: torch.device | str = "cpu", root: Path | None = None) -> TeacherCache:
    """The cache entry for (teacher, dataset): loaded when present, else computed and stored."""
    key = text_digest(FORMAT, teacher_fingerprint(teacher), dataset_fingerprint(dataset))

    def build(tmp: Path) -> None:
        logits, pooled = compute_teacher_outputs(teacher, dataset, collator, batch_size, device)
        save_file({"logits": logits.contiguous(), "pooled": pooled.contiguous()}, str(tmp / _FILE))
        (tmp / "meta.json").write_text(json.dumps({
            "format": FORMAT, "examples": len(dataset), "num_labels": int(logits.shape[1]),
            "layers": int(pooled.shape[1]) - 1, "hidden": int(pooled.shape[2]), "dtype": "float16",
            "teacher_class": type(teacher).__name__}, indent=2))

    path = cached_dir((root or cache_root()) / "teacher", key, build, ready=_FILE)
    tensors = load_file(str(path / _FILE))
    cache = TeacherCache(tensors["logits"], tensors["pooled"], path)
    if len(cache) != len(dataset):
        raise RuntimeError(f"teacher cache {path}: {len(cache)} rows for {len(dataset)} examples")
    return cache
