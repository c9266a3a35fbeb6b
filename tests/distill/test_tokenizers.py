"""Teacher and student tokenizers: a student named by model.name tokenises with its own tokenizer,
checked against the teacher's before any work; a student built from the teacher keeps the teacher's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from deltakd import api
from deltakd.distill.tokenizers import check_tokenizers, tokenizer_difference
from deltakd.errors import DeltakdError
from deltakd.losses import lm
from deltakd.losses.terms import LossInputs, jsd, kd, reverse_kl
from deltakd.runs import RunDir

from ..conftest import FILLER, NEGATIVE, POSITIVE, ROOT, write_recipe

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _bert(out: Path, tok, layers: int = 1, extra_rows: int = 0) -> Path:
    """A tiny random BERT over ``tok`` (``extra_rows`` padding rows in its embedding), saved with it."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok) + extra_rows, hidden_size=32, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def own_words(tmp_path_factory) -> Path:
    """A tiny BERT whose WordPiece vocabulary is the toy task's 26 words (not MiniLM's 30522 tokens)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(POSITIVE + NEGATIVE + FILLER)))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    return _bert(tmp_path_factory.mktemp("own-words"), fast)


@pytest.fixture(scope="module")
def same_words(tmp_path_factory, minilm_path) -> Path:
    """A tiny BERT with MiniLM's tokenizer (saved with model_max_length 64, so it is told apart from the
    teacher's copy) and 8 padding rows in its embedding (config.vocab_size 30530 over 30522 tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path, model_max_length=64)
    return _bert(tmp_path_factory.mktemp("same-words"), tok, extra_rows=8)


def _recipe(tmp_path: Path, toy: Path, teacher: Path, model: str, losses: str = "{ce: 0.5, kd: 0.5}",
            student: str = "") -> Path:
    return write_recipe(tmp_path / "s.yaml", f"""
name: s
output_dir: {tmp_path / 'runs'}
task: {{name: sst2, data_dir: {toy}, resplit_valid: 0.2, max_length: 16}}
teacher: {{model: {teacher}}}
model: {{name: {model}}}
{student}
peft: {{method: full}}
distill: {{losses: {losses}, cache_teacher: false}}
train: {{max_steps: 2, batch_size: 16, seed: 5}}
track: []
""")


def test_a_student_with_the_same_tokenizer_trains_and_saves_its_own(tmp_path, toy_task, tiny_bert, same_words):
    res = api.train(_recipe(tmp_path, toy_task, tiny_bert, str(same_words)))
    saved = json.loads((Path(res["run_dir"]) / "model" / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 64  # the student's own tokenizer, not the teacher's (512)
    assert res["distill"]["teacher_forwards"] == 2


@pytest.mark.parametrize("losses, why", [
    ("{ce: 0.5, kd: 0.5}", "distill.losses kd compare distributions over the teacher's vocabulary"),
    ("{ce: 0.5, hidden_mse: 0.5}", "distill.losses hidden_mse compare token positions, which do not align"),
    ("{ce: 1.0}", "the teacher would read the student's token ids"),
])
def test_a_student_with_another_tokenizer_is_refused_before_work(tmp_path, toy_task, tiny_bert, own_words,
                                                                 minilm_path, losses, why):
    with pytest.raises(DeltakdError) as e:
        api.train(_recipe(tmp_path, toy_task, tiny_bert, str(own_words), losses))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"teacher: its tokenizer '{tiny_bert}' (30522 tokens) differs from the student's "
                          f"'{own_words}' (31 tokens) (30522 vs 31 tokens, teacher vs student); {why}")
    assert msg.endswith("use a student with the teacher's tokenizer (student.from_teacher, or a model.name "
                        "that shares it)")
    assert not (tmp_path / "runs").exists()  # nothing written


def test_cli_exits_2_with_one_line(tmp_path, toy_task, tiny_bert, own_words, capsys, monkeypatch):
    import sys

    from deltakd import cli

    monkeypatch.setattr(sys, "argv", ["deltakd", "train", str(_recipe(tmp_path, toy_task, tiny_bert, str(own_words)))])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "Loading weights" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: teacher: its tokenizer") and "differs" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_a_student_from_the_teacher_keeps_the_teacher_tokenizer(tmp_path, toy_task, tiny_bert, own_words):
    res = api.train(_recipe(tmp_path, toy_task, tiny_bert, str(own_words),
                            student="student: {from_teacher: {layers: [1]}}"))
    saved = json.loads((Path(res["run_dir"]) / "model" / "tokenizer.json").read_text())
    assert len(saved["model"]["vocab"]) == 30522  # MiniLM's, the teacher's; model.name is not the student


def test_tokenizer_difference_names_vocabulary_and_special_tokens(minilm_path):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(minilm_path)
    b = AutoTokenizer.from_pretrained(minilm_path, model_max_length=64)
    assert tokenizer_difference(a, b) is None
    check_tokenizers(a, b, ["kd"])  # the same tokens: passes
    b.pad_token = "[SEP]"
    assert tokenizer_difference(a, b) == "pad_token_id 0 vs 102"
    c = AutoTokenizer.from_pretrained(minilm_path)
    c.add_tokens(["<new>"])
    assert tokenizer_difference(a, c) == "30522 vs 30523 tokens"


def test_same_vocabulary_with_another_normalisation_is_told_apart(minilm_path, tmp_path):
    """MiniLM's vocabulary with lowercasing switched off: same tokens and ids, different token ids for text."""
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(minilm_path)
    a.save_pretrained(tmp_path / "cased")
    for name, key in (("tokenizer.json", "normalizer"), ("tokenizer_config.json", None)):
        data = json.loads((tmp_path / "cased" / name).read_text())
        (data[key] if key else data)["lowercase" if key else "do_lower_case"] = False
        (tmp_path / "cased" / name).write_text(json.dumps(data))
    b = AutoTokenizer.from_pretrained(tmp_path / "cased")
    assert a.get_vocab() == b.get_vocab()
    diff = tokenizer_difference(a, b)
    assert diff is not None and diff.startswith("same vocabulary but 'Hello World, THIS is a Test.' tokenises as [hello")
    with pytest.raises(DeltakdError, match="same vocabulary but"):
        check_tokenizers(b, a, ["kd"])


# --- causal LMs: same tokenizer, embeddings of different widths -----------------------------------


def test_lm_logit_losses_compare_up_to_the_tokenizer_length():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 9)  # (B, L, V): student 7 rows, teacher 9, tokenizer 5
    labels = torch.randint(0, 5, (2, 4))
    x = LossInputs(kind="lm", student=type("Out", (), {"logits": s})(), labels=labels, teacher_logits=t,
                   temperature=2.0, vocab=5)
    mask = lm.next_token_mask(labels)
    assert torch.allclose(kd(x), lm.token_kl(s[..., :5], t[..., :5], 2.0, mask))
    assert torch.allclose(reverse_kl(x), lm.token_kl(s[..., :5], t[..., :5], 2.0, mask, reverse=True))
    assert torch.allclose(jsd(x), lm.generalized_jsd(s[..., :5], t[..., :5], 0.5, 2.0, mask))
    same = LossInputs(kind="lm", student=type("Out", (), {"logits": s})(), labels=labels, teacher_logits=t[..., :7],
                      vocab=5)
    assert same.token_logits[0].shape[-1] == 7  # equal widths: untouched


def _gpt2(out: Path, tok, layers: int, extra_rows: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok) + extra_rows, n_layer=layers, n_embd=32, n_head=2,
                               n_positions=32)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("lm")
    stories = (ROOT / "data" / "tinystories" / "train.txt").read_text(encoding="utf-8").split("<|endoftext|>")
    stories = [s.strip() for s in stories if s.strip()]
    (d / "train.txt").write_text("<|endoftext|>".join(stories[:30]), encoding="utf-8")
    (d / "valid.txt").write_text("<|endoftext|>".join(stories[30:35]), encoding="utf-8")
    return d, stories[:30]


def _lm_recipe(tmp_path: Path, data: Path, teacher: Path, student: Path) -> Path:
    return write_recipe(tmp_path / "lm.yaml", f"""
name: lm
output_dir: {tmp_path / 'runs'}
task: {{name: tiny-stories, kind: lm, data_dir: {data}, train_file: train.txt, valid_file: valid.txt, block_size: 16}}
teacher: {{model: {teacher}}}
model: {{name: {student}}}
peft: {{method: full}}
distill: {{losses: {{ce: 0.5, kd: 0.5}}}}
train: {{max_steps: 3, batch_size: 8, eval_batch_size: 8, seed: 1, logging_steps: 1}}
track: []
""")


def test_lm_padded_teacher_vocabulary_distils_over_the_shared_tokens(tmp_path, lm_data):
    from deltakd.data.lm import train_bpe_tokenizer

    data, texts = lm_data
    tok = train_bpe_tokenizer(texts, 300, tmp_path / "tok")
    teacher = _gpt2(tmp_path / "teacher", tok, layers=2, extra_rows=12)  # logits 12 wider than the tokenizer
    student = _gpt2(tmp_path / "student", tok, layers=1)
    res = api.train(_lm_recipe(tmp_path, data, teacher, student))
    terms = [e["loss_kd"] for e in RunDir(Path(res["run_dir"])).read_events() if "loss_kd" in e]
    assert terms and all(math.isfinite(v) and v >= 0 for v in terms)


def test_lm_student_with_another_tokenizer_is_refused(tmp_path, lm_data):
    from deltakd.data.lm import train_bpe_tokenizer

    data, texts = lm_data
    teacher = _gpt2(tmp_path / "teacher", train_bpe_tokenizer(texts, 300, tmp_path / "t-tok"), layers=2)
    student = _gpt2(tmp_path / "student", train_bpe_tokenizer(texts, 280, tmp_path / "s-tok"), layers=1)
    with pytest.raises(DeltakdError, match=r"^teacher: its tokenizer '.*teacher' \(\d+ tokens\) differs from the "
                                           r"student's '.*student' \(\d+ tokens\) .*distill.losses kd compare"):
        api.train(_lm_recipe(tmp_path, data, teacher, student))
    assert not (tmp_path / "runs").exists()
