"""Stage 1, the teacher: any sentence-transformers model, and its English embeddings cached on disk.

A frozen sentence encoder is a deterministic function of its input text, so the embedding of
every English training sentence is computed once and stored (float32 safetensors) under
``<cache>/multistage-teacher/<key>``; ``key`` hashes the teacher (weights, config, every module's
settings: pooling, normalisation, max length) and the sentences in order. A changed teacher, data
file or limit builds a new entry; entries are published by an atomic rename (``utils.cached_dir``),
so a killed build leaves nothing half-written. Under torchrun the main process builds the entry
while the others wait, then all read it (``processes.main_process_first``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from safetensors.torch import load_file, save_file
from torch import Tensor

from ..distill.cache import teacher_fingerprint
from ..errors import DeltakdError
from ..models.hub import model_dir
from ..utils import cache_root, cached_dir, text_digest
from .processes import main_process_first
from .saving import sentence_transformers

__all__ = ["TeacherEmbeddings", "load_teacher", "st_fingerprint", "teacher_embeddings"]

FORMAT = "multistage-teacher-v1"
_FILE = "embeddings.safetensors"


def load_teacher(name: str, max_seq_length: int | None = None, device: str | None = None,
                 revision: str | None = None) -> Any:
    """A ``SentenceTransformer`` from a packaged alias, local folder or hub id (at ``revision``), in eval mode."""
    st_class = sentence_transformers().SentenceTransformer
    path = str(model_dir(name, revision, "teacher.model"))
    try:
        st = st_class(path, device=device or "cpu")
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "not found locally and the hub is offline (HF_HUB_OFFLINE=1)" if offline else str(e).splitlines()[0]
        raise DeltakdError(f"teacher.model '{name}': {why}") from None
    if max_seq_length is not None:
        st.max_seq_length = max_seq_length
    st.eval()
    for p in st.parameters():
        p.requires_grad_(False)
    return st


def st_fingerprint(st_model: Any) -> str:
    """Hash of a SentenceTransformer: weights + config of its transformer, and every module's settings."""
    h = hashlib.sha256(teacher_fingerprint(st_model[0].auto_model).encode())
    for module in st_model:
        h.update(type(module).__name__.encode())
        cfg = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(str(st_model.max_seq_length).encode())
    return h.hexdigest()


@dataclass
class TeacherEmbeddings:
    """Teacher embeddings of unique sentences; ``lookup`` maps sentences to rows."""

    sentences: list[str]
    embeddings: Tensor  # (N, H) float32
    path: Path | None

    def __post_init__(self) -> None:
        self._row = {s: i for i, s in enumerate(self.sentences)}

    def lookup(self, sentences: Sequence[str]) -> Tensor:
        """(len(sentences), H) rows for sentences that were embedded."""
        return self.embeddings[[self._row[s] for s in sentences]]


def _encode(st_model: Any, sentences: list[str], batch_size: int) -> Tensor:
    emb = st_model.encode(sentences, batch_size=batch_size, convert_to_tensor=True,
                          show_progress_bar=len(sentences) > 4 * batch_size)
    return emb.float().cpu().contiguous()  # (N, H)


def teacher_embeddings(st_model: Any, sentences: Sequence[str], batch_size: int = 64,
                       root: Path | None = None, cache: bool = True) -> TeacherEmbeddings:
    """Teacher embeddings of the unique ``sentences`` (first-appearance order), from the disk cache
    when present; built and stored otherwise (``cache=False``: computed, not stored)."""
    unique = list(dict.fromkeys(sentences))
    if not cache:
        return TeacherEmbeddings(unique, _encode(st_model, unique, batch_size), None)
    key = text_digest(FORMAT, st_fingerprint(st_model), hashlib.sha256("\n".join(unique).encode()).hexdigest(),
                      len(unique))

    def build(tmp: Path) -> None:
        emb = _encode(st_model, unique, batch_size)
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "sentences": len(unique),
                                                   "dim": int(emb.shape[1])}, indent=2))
        (tmp / "sentences.json").write_text(json.dumps(unique, ensure_ascii=False))
        save_file({"embeddings": emb}, str(tmp / _FILE))

    with main_process_first():  # under torchrun: the main process builds, the others read its entry
        path = cached_dir((root or cache_root()) / "multistage-teacher", key, build, ready=_FILE)
    emb = load_file(str(path / _FILE))["embeddings"]
    if emb.shape[0] != len(unique):
        raise RuntimeError(f"teacher cache {path}: {emb.shape[0]} rows for {len(unique)} sentences")
    return TeacherEmbeddings(unique, emb, path)


def cache_is_built(st_model: Any, sentences: Sequence[str], root: Path | None = None) -> bool:
    """Whether ``teacher_embeddings`` would load rather than compute (for tests and reports)."""
    unique = list(dict.fromkeys(sentences))
    key = text_digest(FORMAT, st_fingerprint(st_model), hashlib.sha256("\n".join(unique).encode()).hexdigest(),
                      len(unique))
    return ((root or cache_root()) / "multistage-teacher" / key / _FILE).is_file()

