from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, default_data_collator

from deltakd.data import lm
from deltakd.data.lm import (get_or_train_tokenizer, lm_blocks_cached, make_blocks, read_texts,
                             train_bpe_tokenizer)
from deltakd.errors import DeltakdError

from ..conftest import ROOT

EOS = "<|endoftext|>"
STORIES = ROOT / "data" / "tinystories"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """About 10 KB of shipped TinyStories text."""
    docs = read_texts([STORIES / "train.txt"])
    out, size = [], 0
    for d in docs:
        out.append(d)
        size += len(d)
        if size > 10_000:
            return out
    return out


@pytest.fixture(scope="module")
def bpe(texts, tmp_path_factory) -> tuple[PreTrainedTokenizerFast, Path]:
    out = tmp_path_factory.mktemp("bpe")
    return train_bpe_tokenizer(texts, 300, out), out


def word_tokenizer(words: str) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: id 0 is EOS, then one id per word, in order."""
    vocab = {EOS: 0, **{w: i + 1 for i, w in enumerate(words.split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token=EOS)


# ---- read_texts ---------------------------------------------------------------------------------

def test_read_texts_splits_on_separator_reads_gz_and_drops_empty(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text(f"first story.\nsecond line\n{EOS}\n\n{EOS}\nsecond story\n{EOS}\n", encoding="utf-8")
    b = tmp_path / "b.txt.gz"
    with gzip.open(b, "wt", encoding="utf-8") as f:
        f.write(f"gz one{EOS}gz two")
    c = tmp_path / "c.txt"
    c.write_text("no separator here\n\nstill the same document\n", encoding="utf-8")
    assert read_texts([a, b, c]) == ["first story.\nsecond line", "second story", "gz one", "gz two",
                                     "no separator here\n\nstill the same document"]
    assert read_texts([b], doc_separator=None) == [f"gz one{EOS}gz two"]


def test_read_texts_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DeltakdError, match=r"lm data file '.*nope\.txt' does not exist"):
        read_texts([missing])


def test_shipped_tinystories_samples_are_disjoint():
    train, valid, test = (read_texts([STORIES / f"{s}.txt"]) for s in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == (1440, 67, 73)
    assert not set(valid) & set(test) and not set(train) & (set(valid) | set(test))
    assert 1_150_000 < (STORIES / "train.txt").stat().st_size < 1_250_000


# ---- tokenizer ----------------------------------------------------------------------------------

def test_bpe_round_trips_and_reloads(bpe):
    tok, out = bpe
    s = 'Tim said, "Don\'t   worry!"\nThe café was 3.5 km away. 你好'
    ids = tok(s)["input_ids"]
    assert tok.decode(ids) == s
    assert tok.eos_token == EOS and tok.pad_token == EOS and tok.eos_token_id == tok.convert_tokens_to_ids(EOS)
    assert len(tok) <= 300 and len(tok) > 256  # some merges learned on top of the 256 bytes
    assert len(ids) < len(s.encode("utf-8"))  # merges make it shorter than bytes
    again = AutoTokenizer.from_pretrained(out)
    assert again(s)["input_ids"] == ids and again.eos_token == EOS and len(again) == len(tok)


def test_bpe_is_deterministic(texts, bpe, tmp_path):
    tok, _ = bpe
    other = train_bpe_tokenizer(texts, 300, tmp_path)
    assert other.get_vocab() == tok.get_vocab()


def test_bpe_vocab_too_small():
    with pytest.raises(DeltakdError, match="vocab_size 100 is too small"):
        train_bpe_tokenizer(["a b c"], 100, Path("unused"))


def test_get_or_train_tokenizer_caches(texts, tmp_path, monkeypatch):
    first = get_or_train_tokenizer(None, texts, 300, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1

    def boom(*a, **k):
        raise AssertionError("retrained instead of loading the cache")

    monkeypatch.setattr(lm, "train_bpe_tokenizer", boom)
    second = get_or_train_tokenizer(None, iter(texts), 300, cache_dir=tmp_path)
    assert second.get_vocab() == first.get_vocab() and second.eos_token == EOS
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1
    with pytest.raises(AssertionError, match="retrained"):  # another vocab size is another key
        get_or_train_tokenizer(None, texts, 280, cache_dir=tmp_path)


def test_get_or_train_tokenizer_loads_path_and_sets_pad(tmp_path):
    word_tokenizer("a b c").save_pretrained(tmp_path / "wl")
    tok = get_or_train_tokenizer(str(tmp_path / "wl"), [], 300, cache_dir=tmp_path)
    assert tok.eos_token == EOS and tok.pad_token == EOS and tok("a c")["input_ids"] == [1, 3]
    with pytest.raises(DeltakdError, match="cannot load tokenizer 'no-such-org/no-such-tokenizer'"):
        get_or_train_tokenizer("no-such-org/no-such-tokenizer", [], 300, cache_dir=tmp_path)
    with pytest.raises(DeltakdError, match="tokenizer directory '.*missing' does not exist"):
        get_or_train_tokenizer(str(tmp_path / "missing"), [], 300, cache_dir=tmp_path)


# ---- blocks -------------------------------------------------------------------------------------

def test_make_blocks_hand_computed():
    tok = word_tokenizer("a b c d e f g h i")
    docs = ["a b c", "d e", "f g h i"]
    # stream: a b c EOS d e EOS f g h i EOS -> 12 tokens; blocks of 5 drop the last 2
    ds = make_blocks(docs, tok, 5)
    assert ds["input_ids"] == [[1, 2, 3, 0, 4], [5, 0, 6, 7, 8]]
    assert ds["labels"] == ds["input_ids"]
    assert make_blocks(docs, tok, 12)["input_ids"] == [[1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0]]
    with pytest.raises(DeltakdError, match="valid.txt has 12 tokens, fewer than one block of 13"):
        make_blocks(docs, tok, 13, name="valid.txt")


def test_make_blocks_is_a_prefix_of_the_eos_joined_stream(texts, bpe):
    tok, _ = bpe
    stream = []
    for d in texts:
        stream += tok.encode(d) + [tok.eos_token_id]
    ds = make_blocks(texts, tok, 64)
    n = len(stream) // 64
    assert len(ds) == n and all(len(row) == 64 for row in ds["input_ids"])
    assert sum(ds["input_ids"], []) == stream[: n * 64]
    assert stream.count(tok.eos_token_id) == len(texts)


def test_lm_blocks_cached_loads_second_time(texts, bpe, tmp_path, monkeypatch):
    tok, _ = bpe
    first = lm_blocks_cached(texts, tok, 32, cache_dir=tmp_path)
    monkeypatch.setattr(lm, "make_blocks", lambda *a, **k: pytest.fail("not cached"))
    second = lm_blocks_cached(texts, tok, 32, cache_dir=tmp_path)
    assert second["input_ids"] == first["input_ids"] and len(list((tmp_path / "lm_blocks").iterdir())) == 1


def test_tiny_gpt2_trains_on_blocks(texts, bpe):
    tok, _ = bpe
    block = 32
    ds = make_blocks(texts, tok, block)
    batch = default_data_collator([ds[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, block) and batch["input_ids"].dtype == torch.long
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=block,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    loss = GPT2LMHeadModel(cfg)(**batch).loss
    assert math.isfinite(loss.item())
    assert abs(loss.item() - math.log(len(tok))) < 1.0  # untrained: close to uniform over the vocab
