"""Bits per byte of causal-LM results and distillation across tokenizers (``distill.cross_tokenizer``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deltakd import api
from deltakd.data.lm import make_blocks, train_bpe_tokenizer
from deltakd.data.lm_offsets import (
    TEACHER_IDS,
    TEACHER_POSITIONS,
    align_blocks,
    bits_per_byte,
    block_bytes,
    cross_tokenizer_columns,
    token_stream,
)
from deltakd.distill.cross_tokenizer import (
    TeacherTokensCollator,
    align_teacher,
    first_token_map,
    gather_aligned,
)
from deltakd.distill.tokenizers import check_tokenizers
from deltakd.errors import DeltakdError

from .conftest import write_recipe
from .test_partial_kd import _base, _text


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return ["Once upon a time there was a cat.", "The cat sat on the mat and was happy.",
            "A dog came by; the dog said hello to the cat."] * 8


@pytest.fixture(scope="module")
def bytes_tok(tmp_path_factory, texts):
    """Byte-level BPE with no merges: one token per byte (+ EOS)."""
    return train_bpe_tokenizer(texts, 257, tmp_path_factory.mktemp("bytes"))


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory, texts):
    return train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("bpe300"))


def test_token_byte_ends_and_block_bytes_by_hand(bytes_tok):
    docs = ["ab", "é", "cd"]  # stream: a b EOS | C3 A9 EOS | c d EOS ; é is 2 bytes, EOS counts 1
    ids, ends = token_stream(docs, bytes_tok)
    assert ids.tolist() == np.asarray(make_blocks(docs, bytes_tok, 9)["input_ids"]).reshape(-1).tolist()
    assert ends.tolist() == [1, 2, 3, 5, 5, 6, 7, 8, 9]  # the first half of é is credited with the whole character
    # blocks of 3 predict tokens 1..2: b+EOS = 2 bytes, A9+EOS = 0+1, d+EOS = 2
    assert block_bytes(docs, bytes_tok, 3).tolist() == [2, 1, 2]
    assert block_bytes(docs, bytes_tok, 4).tolist() == [5 - 1, 8 - 5]  # b EOS C3 | EOS c d; the last EOS dropped
    assert bits_per_byte(2.0, 10, 4) == pytest.approx(2.0 * 10 / math.log(2) / 4)


def test_block_bytes_match_the_decoded_text(texts, bpe_tok):
    """Independent count: each block's predicted tokens decoded (EOS as one character) and encoded."""
    blocks = np.asarray(make_blocks(texts, bpe_tok, 16)["input_ids"])
    eos = bpe_tok.eos_token
    want = [len(bpe_tok.decode(b[1:].tolist()).replace(eos, "\n").encode("utf-8")) for b in blocks]
    got = block_bytes(texts, bpe_tok, 16)
    assert got.tolist() == want


def test_alignment_by_hand():
    student = (np.arange(6), np.asarray([1, 2, 3, 5, 5, 6]))  # a b EOS | C3 A9 EOS (byte tokens)
    teacher = (np.asarray([10, 11, 12, 13]), np.asarray([2, 3, 5, 6]))  # "ab" EOS | "é" EOS
    ids, pos = align_blocks(student, teacher, 3, max_teacher_len=8)
    assert ids == [[10, 11], [12, 13]]
    assert pos.tolist() == [[-1, 0, 1], [-1, 0, 1]]  # "a" ends inside "ab"; C3 is half a character
    ids, pos = align_blocks(student, teacher, 6, max_teacher_len=3)  # one block, the teacher cut from the left
    assert ids == [[11, 12, 13]] and pos.tolist() == [[-1, -1, 0, -1, 1, 2]]


def test_teacher_tokens_cover_the_student_block_text(texts, bytes_tok, bpe_tok):
    cols = cross_tokenizer_columns(texts, bpe_tok, bytes_tok, 12, 64)  # student: merges; teacher: bytes
    blocks = np.asarray(make_blocks(texts, bpe_tok, 12)["input_ids"])
    assert len(cols[TEACHER_IDS]) == len(blocks)
    for b, t_ids, pos in zip(blocks, cols[TEACHER_IDS], cols[TEACHER_POSITIONS]):
        assert bpe_tok.decode(b.tolist()) == bytes_tok.decode(t_ids)  # same text (every byte token starts one)
        for i, j in enumerate(pos):  # every student boundary is a byte boundary: aligned, to the same prefix
            assert j >= 0
            assert bytes_tok.decode(t_ids[:j + 1]) == bpe_tok.decode(b[:i + 1].tolist())


def test_collator_pads_teacher_tokens_and_gather_picks_aligned_positions():
    feats = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], TEACHER_IDS: [7, 8], TEACHER_POSITIONS: [-1, 0, 1]},
             {"input_ids": [4, 5, 6], "labels": [4, 5, 6], TEACHER_IDS: [9], TEACHER_POSITIONS: [0, -1, -1]}]
    batch = TeacherTokensCollator(pad_id=0)(feats)
    assert batch[TEACHER_IDS].tolist() == [[7, 8], [9, 0]]
    assert batch["teacher_attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["input_ids"].shape == (2, 3) and TEACHER_IDS in feats[0]  # the features are left as they were
    states = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3)  # (B, Lt, D)
    picked, aligned = gather_aligned(states, batch[TEACHER_POSITIONS])
    assert aligned.tolist() == [[False, True, True], [True, False, False]]
    torch.testing.assert_close(picked[0, 1], states[0, 0])
    torch.testing.assert_close(picked[0, 2], states[0, 1])
    torch.testing.assert_close(picked[1, 0], states[1, 0])
    assert float(picked[1, 1].abs().sum()) == 0.0
    out = SimpleNamespace(logits=states, hidden_states=(states + 1, states + 2))
    teacher, aligned2 = align_teacher(out, batch[TEACHER_POSITIONS], hidden=True)
    assert torch.equal(aligned2, aligned) and torch.equal(teacher.logits, picked)
    torch.testing.assert_close(teacher.hidden_states[1][0, 2], states[0, 1] + 2)
    assert float(teacher.hidden_states[0][1, 2].abs().sum()) == 0.0
    assert align_teacher(out, batch[TEACHER_POSITIONS], hidden=False)[0].hidden_states is None
    plain = TeacherTokensCollator(0)([{"input_ids": [1], "labels": [1]}])
    assert set(plain) == {"input_ids", "labels"}


def test_first_token_map(bytes_tok, bpe_tok):
    m = first_token_map(bpe_tok, bytes_tok)  # teacher with merges -> byte student: the token's first byte
    merged = 0
    for i in range(len(bpe_tok)):
        text = bpe_tok.convert_tokens_to_string([bpe_tok.convert_ids_to_tokens(i)])
        if i == bpe_tok.eos_token_id:
            assert int(m[i]) == bytes_tok.eos_token_id
        elif "\ufffd" in text:  # a lone byte of a multi-byte character
            assert int(m[i]) == -1
        else:  # ASCII here: the first byte is the first character
            assert bytes_tok.decode([int(m[i])]) == text[0]
            merged += len(text) > 1
    assert merged > 10
    back = first_token_map(bytes_tok, bpe_tok)  # bytes -> merges: every ASCII byte is a token of both
    ascii_ids = [i for i in range(1, len(bytes_tok)) if bytes_tok.decode([i]).isascii()]
    assert len(ascii_ids) == 128 and all(bpe_tok.decode([int(back[i])]) == bytes_tok.decode([i]) for i in ascii_ids)


def test_preflight_routes_a_different_tokenizer_only_when_asked(bytes_tok, bpe_tok):
    with pytest.raises(DeltakdError, match=r"differs from the student's.*a model.name that shares it\)$"):
        check_tokenizers(bpe_tok, bytes_tok, ["ce", "uld"])  # classification: no other road
    with pytest.raises(DeltakdError, match=r"differs from the student's.*, or distill.cross_tokenizer: true with "
                                           r"distill.losses uld or kd_mapped \(\+ ce\)$"):
        check_tokenizers(bpe_tok, bytes_tok, ["ce", "uld"], cross_possible=True)
    with pytest.raises(DeltakdError, match=r"distill.cross_tokenizer pairs positions by text offset, but "
                                           r"distill.losses kd, attention_kl need a shared vocabulary.*use ce, hidden_mse, "
                                           r"hidden_cos, uld, kd_mapped$"):
        check_tokenizers(bpe_tok, bytes_tok, ["ce", "kd", "attention_kl"], cross_tokenizer=True)
    assert check_tokenizers(bpe_tok, bytes_tok, ["ce", "uld", "kd_mapped"], cross_tokenizer=True) is True
    assert check_tokenizers(bpe_tok, bpe_tok, ["kd"], cross_tokenizer=True) is False
    from deltakd.families import FAMILIES

    recipe = SimpleNamespace(student=None, distill=SimpleNamespace(cross_tokenizer=True))
    with pytest.raises(DeltakdError, match="distill.cross_tokenizer: applies to causal-LM distillation"):
        FAMILIES["classification"].student_tokenizer(recipe, bpe_tok, lambda: bytes_tok)


def test_bits_per_byte_of_a_run_by_hand(tmp_path):
    """The run's test bits/byte from its saved model: total next-token NLL / ln 2 / bytes of the
    decoded predicted tokens (ASCII stories: decoding any run of tokens gives their bytes exactly);
    ``deltakd eval`` reports the same."""
    from deltakd.models.delta import load_trained

    data = _text(tmp_path)
    for split in ("train", "valid", "test"):
        f = data / f"{split}.txt"
        f.write_text("<|endoftext|>".join(d for d in f.read_text(encoding="utf-8").split("<|endoftext|>")
                                          if d.isascii()), encoding="utf-8")
    base = _base(tmp_path, data).replace("epochs: 3", "max_steps: 3")
    r = api.train(write_recipe(tmp_path / "t.yaml", base + """
name: t
model: {config: {model_type: gpt2, n_layer: 1, n_embd: 16, n_head: 2, n_positions: 32}, vocab_size: 300}
"""))
    model, tok = load_trained(Path(r["run_dir"]) / "model")
    model.eval()
    docs = [d.strip() for d in (data / "test.txt").read_text(encoding="utf-8").split("<|endoftext|>") if d.strip()]
    blocks = torch.tensor(make_blocks(docs, tok, 32)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=blocks).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1),
                                            reduction="sum").item()
    n_bytes = sum(len(tok.decode(b[1:].tolist()).replace(tok.eos_token, "\n").encode("utf-8")) for b in blocks)
    want = nll / math.log(2) / n_bytes
    got = r["metrics"]["test"]["bits_per_byte"]
    assert got == pytest.approx(want, rel=1e-4)
    assert r["metrics"]["valid"]["bits_per_byte"] > 0
    assert api.evaluate(r["run_dir"], "test")["bits_per_byte"] == pytest.approx(got, rel=1e-5)


def test_cross_tokenizer_kd_trains_and_compares_the_teacher_on_its_own_tokens(tmp_path):
    data = _text(tmp_path)
    base = _base(tmp_path, data).replace("epochs: 3", "max_steps: 12").replace("logging_steps: 5", "logging_steps: 2")
    t = api.train(write_recipe(tmp_path / "t.yaml", base.replace("max_steps: 12", "max_steps: 6") + """
name: t
model: {config: {model_type: gpt2, n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64}, vocab_size: 512}
"""))
    student = base + f"""
teacher: {{run: {tmp_path / 'runs' / 't'}}}
model: {{config: {{model_type: gpt2, n_layer: 1, n_embd: 32, n_head: 2, n_positions: 32}}, vocab_size: 1024}}
"""
    own = train_bpe_tokenizer(
        [d for d in (data / "train.txt").read_text(encoding="utf-8").split("<|endoftext|>") if d.strip()],
        1024, tmp_path / "tokenizer-b")
    assert len(own) > 512
    refused = student.replace("model: {config:", f"model: {{tokenizer: {tmp_path / 'tokenizer-b'}, config:")
    with pytest.raises(DeltakdError, match="or distill.cross_tokenizer: true with distill.losses uld or kd_mapped"):
        api.train(write_recipe(tmp_path / "refused.yaml", refused + "name: refused\n"
                               "distill: {losses: {ce: 0.5, uld: 0.5}}\n"))
    assert not (tmp_path / "runs" / "refused").exists()
    s = api.train(write_recipe(tmp_path / "s.yaml", student + "name: s\n"
                               "distill: {losses: {ce: 0.5, uld: 0.5, kd_mapped: 0.5, hidden_mse: 0.1}, cross_tokenizer: true, "
                               "temperature: 1.0}\n"))
    s_tok = json.loads((Path(s["run_dir"]) / "model" / "config.json").read_text())["vocab_size"]
    t_tok = json.loads((Path(t["run_dir"]) / "model" / "config.json").read_text())["vocab_size"]
    assert s_tok != t_tok  # two different tokenizers
    events = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    logged = [e for e in events if "loss_uld" in e]
    assert len(logged) >= 5 and all(e["loss_uld"] > 0 and e["loss_kd_mapped"] > 0 and e["loss_hidden_mse"] > 0
                                    for e in logged)
    losses = [e["loss"] for e in logged]
    assert losses[-1] < 0.95 * losses[0] and losses[-1] == min(losses), losses
    d = s["distill"]
    assert d["teacher_forwards"] == 12
    # the teacher is compared on its own tokens of the test text: its own run's figures
    assert d["teacher_metrics"]["test"]["loss"] == pytest.approx(t["metrics"]["test"]["loss"], rel=1e-5)
    assert d["teacher_metrics"]["test"]["bits_per_byte"] == pytest.approx(t["metrics"]["test"]["bits_per_byte"],
                                                                          rel=1e-5)
    assert 0 < s["metrics"]["test"]["bits_per_byte"] < 8 * 2  # finite, per byte


def test_scored_tokens_follow_the_trainers_divisor():
    """GPT-2 has no ``loss_type``: the Trainer divides by every label; a ``ForCausalLM`` loss type by
    the shifted ones (``test_bits_per_byte_of_a_run_by_hand`` checks the first end to end)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from deltakd.causal_lm.family import scored_tokens

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8))
    assert scored_tokens(model, 5, 8) == 40
    model.loss_type = "ForCausalLM"
    assert scored_tokens(model, 5, 8) == 35
