"""Shared fixtures: offline hub, a private cache, tiny models built from configs, small data files."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

POSITIVE = ["good", "great", "fine", "lovely", "superb", "wonderful", "excellent", "nice"]
NEGATIVE = ["bad", "awful", "poor", "boring", "dull", "terrible", "weak", "ugly"]
FILLER = ["the", "movie", "was", "really", "quite", "plot", "acting", "a", "film", "story"]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    os.environ["DELTAKD_CACHE"] = str(tmp_path_factory.mktemp("deltakd-cache"))


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from deltakd.models.hub import resolve_model_path

    return resolve_model_path("minilm-l6")


def write_tiny_bert(out: Path, tokenizer_path: str, layers: int = 2, positions: int = 128) -> Path:
    """A hidden-32 BERT of ``layers`` layers with random weights (seed 0) and the given tokenizer, saved to ``out``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=positions)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer, hidden-32 BERT with random weights and MiniLM's tokenizer, saved to disk."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm_path)


def sentiment_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """A synthetic task a tiny model learns quickly: the label is the sentiment word's polarity."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(POSITIVE if label else NEGATIVE)
        words = rng.sample(FILLER, 4)
        words.insert(rng.randint(0, 4), word)
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path: Path, rows: list[tuple[str, int]], header=("sentence", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)] + [f"{t}\t{y}" for t, y in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def toy_task(tmp_path) -> Path:
    """SST-2-shaped folder (train.tsv, dev.tsv) of the synthetic sentiment task."""
    return write_toy_task(tmp_path / "toy")


def write_toy_task(d: Path) -> Path:
    """The synthetic sentiment task in ``d`` (train.tsv: 400 rows, dev.tsv: 100 rows)."""
    write_tsv(d / "train.tsv", sentiment_rows(400, 1))
    write_tsv(d / "dev.tsv", sentiment_rows(100, 2))
    return d


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def hub_models(tmp_path_factory, minilm_path) -> tuple[Path, dict[str, str]]:
    """Tiny models in a hub-cache layout (``tests/hubcache.py``): the ``HF_HOME`` and each repo's commit."""
    from .hubcache import build_hub

    stories = (ROOT / "data" / "tinystories" / "train.txt").read_text(encoding="utf-8").split("<|endoftext|>")
    return build_hub(tmp_path_factory.mktemp("hub"), minilm_path, [s.strip() for s in stories[:200] if s.strip()])


@pytest.fixture()
def hub_home(hub_models, monkeypatch) -> dict[str, str]:
    """``HF_HOME`` pointed at the tiny hub cache for this test (offline, as every test): repo -> commit."""
    from huggingface_hub import constants

    home, commits = hub_models
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return commits
