"""Tiny models written into a Hugging Face hub-cache layout, so hub ids load offline in tests.

The layout is huggingface_hub's (``huggingface_hub.file_download``, ``scan_cache_dir``)::

    <HF_HOME>/hub/models--ORG--NAME/
        blobs/<sha256 of the file>
        snapshots/<commit>/<file>  -> ../../blobs/<sha256>   (a relative symlink)
        refs/main                   <commit>

``commit`` is a 40-hex digest of the folder's files, as a real commit hash looks. Which models:
:data:`REPOS` (built by :func:`build_hub`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

ORG = "deltakd-test"
BERT = f"{ORG}/tiny-bert"                # 2-layer hidden-32 BERT, MiniLM's tokenizer (teacher / backbone)
BERT_STUDENT = f"{ORG}/tiny-bert-1l"     # 1 layer, MiniLM's tokenizer saved with model_max_length 64
GPT2 = f"{ORG}/tiny-gpt2"                # 2-layer GPT-2, byte-level BPE; embedding padded to 320 rows
GPT2_STUDENT = f"{ORG}/tiny-gpt2-1l"     # 1 layer, the same BPE; embedding padded to 384 rows
GPT2_OTHER = f"{ORG}/tiny-gpt2-otherbpe"  # 1 layer, another BPE (different tokenizer)
SENTENCE = f"{ORG}/tiny-sentence"        # a sentence-transformers folder (Transformer + mean pooling)
PINNED = f"{ORG}/tiny-gpt2-pinned"       # GPT2's files under the tag ``v1`` only (no ``main``): loads only at v1


def commit_of(folder: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def cache_model(hf_home: Path, repo_id: str, folder: Path, ref: str = "main") -> str:
    """Put the model ``folder`` into the hub cache under ``hf_home`` as ``repo_id`` at ``ref``; its commit."""
    from huggingface_hub.file_download import repo_folder_name

    commit = commit_of(folder)
    repo = Path(hf_home) / "hub" / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / commit
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        data = p.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return commit


def _bert(out: Path, tokenizer, layers: int) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(layers)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _gpt2(out: Path, tokenizer, layers: int, rows: int) -> Path:
    """A GPT-2 over ``tokenizer`` whose embedding (and tied LM head) is resized to ``rows`` >= len(tokenizer)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(layers)
    eos = tokenizer.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=layers, n_embd=32, n_head=2, n_positions=128,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos,
                                       eos_token_id=eos))
    if rows > len(tokenizer):
        model.resize_token_embeddings(rows, mean_resizing=False)  # padding rows, as Qwen's 151,936 vs 152,064
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _sentence(out: Path, bert_dir: Path) -> Path:
    from sentence_transformers import SentenceTransformer, models

    word = models.Transformer(str(bert_dir), max_seq_length=32)
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[word, pool], device="cpu").save(str(out))
    return out


def build_hub(root: Path, minilm_path: str, texts: list[str]) -> tuple[Path, dict[str, str]]:
    """An ``HF_HOME`` under ``root`` holding :data:`REPOS`; returns it and each repo's commit."""
    from transformers import AutoTokenizer

    from deltakd.data.lm import train_bpe_tokenizer

    src = root / "src"
    minilm = AutoTokenizer.from_pretrained(minilm_path)
    short = AutoTokenizer.from_pretrained(minilm_path, model_max_length=64)
    bpe = train_bpe_tokenizer(texts, 300, src / "bpe")
    other = train_bpe_tokenizer(texts, 280, src / "bpe-other")
    folders = {
        BERT: _bert(src / "bert", minilm, 2),
        BERT_STUDENT: _bert(src / "bert-1l", short, 1),
        GPT2: _gpt2(src / "gpt2", bpe, 2, 320),
        GPT2_STUDENT: _gpt2(src / "gpt2-1l", bpe, 1, 384),
        GPT2_OTHER: _gpt2(src / "gpt2-other", other, 1, len(other)),
    }
    folders[SENTENCE] = _sentence(src / "sentence", folders[BERT])
    home = root / "hf_home"
    commits = {repo: cache_model(home, repo, folder) for repo, folder in folders.items()}
    commits[PINNED] = cache_model(home, PINNED, folders[GPT2], ref="v1")
    shutil.rmtree(src)  # only the cache remains: nothing loads from the build folders
    return home, commits
