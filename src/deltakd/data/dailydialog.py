"""DailyDialog: reader, act-controlled response examples, causal-LM encoding, collators.

DailyDialog (Li et al., IJCNLP 2017) keeps one dialogue per line in three aligned files per
split: ``dialogues_<split>.txt`` (utterances separated by ``__eou__``), ``dialogues_act_<split>.txt``
and ``dialogues_emotion_<split>.txt`` (one space-separated label id per utterance).

A response example is rendered as ``act <eos> context turns <eos> response <eos>`` (act first),
``context turns <eos> act <eos> response <eos>`` (act before the response) or ``context turns <eos>
act response <eos>`` (the act opens the response turn, so the position that predicts the first
response token is the act's own); every segment is tokenised on its own and followed by the
tokenizer's eos id (the act in ``opens_response`` is not). The loss covers only the response
tokens and the final eos. With ``control="emotion"`` the response turn's emotion stands where the act
stands (:data:`CONTROLS`: the labels of each control signal).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import torch

from ..errors import DeltakdError
from ..utils import atomic_write_text, warning

ACTS: tuple[str, ...] = ("inform", "question", "directive", "commissive")  # ids 1..4 in the files
EMOTIONS: tuple[str, ...] = ("no_emotion", "anger", "disgust", "fear", "happiness", "sadness", "surprise")  # ids 0..6
SPLITS: dict[str, str] = {"train": "train", "validation": "validation", "valid": "validation",
                          "dev": "validation", "test": "test"}
EOU = "__eou__"
IGNORE_INDEX = -100


Control = Literal["act", "emotion"]
CONTROLS: dict[str, tuple[str, ...]] = {"act": ACTS, "emotion": EMOTIONS}  # control signal -> its labels


def control_labels(control: str) -> tuple[str, ...]:
    """The labels of a control signal (``act``: :data:`ACTS`, ``emotion``: :data:`EMOTIONS`)."""
    if control not in CONTROLS:
        raise DeltakdError(f"control '{control}' is unknown; valid: {', '.join(CONTROLS)}")
    return CONTROLS[control]


def act_token(label: str) -> str:
    """The added token that stands for a control label when ``act_tokens`` is on: ``<|question|>``,
    ``<|happiness|>``."""
    return f"<|{label}|>"


ActPosition = Literal["first", "before_response", "opens_response"]
ACT_POSITIONS: tuple[str, ...] = get_args(ActPosition)


class Turn(NamedTuple):
    """One utterance with its dialogue act and emotion (names, e.g. ``"question"``, ``"happiness"``)."""

    text: str
    act: str
    emotion: str


Dialogue = list[Turn]


ShortLabels = Literal["drop_dialogue", "drop_last_turn"]


@dataclass
class ReadStats:
    """What reading a split found: dialogues and turns kept, lines whose labels were one short."""

    dialogues: int = 0
    turns: int = 0
    short_label_lines: tuple[int, ...] = ()  # 1-based lines


# ---- reading -----------------------------------------------------------------------------------

def _open_lines(path: Path) -> list[str]:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise DeltakdError(f"{path}: not readable UTF-8 text ({type(e).__name__})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln.rstrip("\r") for ln in lines]


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DeltakdError(f"DailyDialog file '{folder / stem}' (or .gz) does not exist")


def split_files(data_dir: Path, split: str) -> tuple[Path, Path, Path]:
    """Text, act and emotion files of a split, in ``data_dir/<split>/`` or directly in ``data_dir``.

    ``split`` is ``train``, ``validation`` (also ``valid``/``dev``) or ``test``; ``.gz`` files are found too.
    """
    if split not in SPLITS:
        raise DeltakdError(f"DailyDialog split '{split}' is unknown; valid: {', '.join(SPLITS)}")
    name = SPLITS[split]
    data_dir = Path(data_dir)
    folder = data_dir / name if (data_dir / name).is_dir() else data_dir
    return (_find(folder, f"dialogues_{name}.txt"), _find(folder, f"dialogues_act_{name}.txt"),
            _find(folder, f"dialogues_emotion_{name}.txt"))


def _labels(line: str, names: tuple[str, ...], offset: int, where: str, kind: str) -> list[str]:
    out = []
    for tok in line.split():
        try:
            i = int(tok) - offset
        except ValueError:
            raise DeltakdError(f"{where}: {kind} label {tok!r} is not an integer") from None
        if not 0 <= i < len(names):
            raise DeltakdError(f"{where}: {kind} label {tok!r} is out of range "
                               f"{offset}..{offset + len(names) - 1}")
        out.append(names[i])
    return out


def read_dailydialog_files(text_path: Path, act_path: Path, emotion_path: Path,
                           short_labels: ShortLabels = "drop_dialogue") -> tuple[list[Dialogue], ReadStats]:
    """Dialogues from one split's three aligned files.

    A dialogue whose act and emotion labels are both exactly one short of its utterances (train
    line 7852 of the original release) is dropped (``short_labels="drop_dialogue"``) or loses its
    last turn (``"drop_last_turn"``), with one warning for the split that counts them. Dropping
    is the default because in line 7852 the missing label is not the last one: utterances 5 and
    6 are one speaker's turn split in two, so the labels from utterance 6 on belong one turn
    later. Any other malformed line (label count mismatch, bad label, empty utterance, files of
    different lengths) raises :class:`DeltakdError` naming the file and 1-based line.
    """
    if short_labels not in ("drop_dialogue", "drop_last_turn"):
        raise DeltakdError(f"short_labels '{short_labels}' is unknown; valid: drop_dialogue, drop_last_turn")
    text_path, act_path, emotion_path = Path(text_path), Path(act_path), Path(emotion_path)
    texts, acts, emos = _open_lines(text_path), _open_lines(act_path), _open_lines(emotion_path)
    n = len(texts)
    for path, rows in ((act_path, acts), (emotion_path, emos)):
        if len(rows) != n:
            raise DeltakdError(f"{path} line {min(len(rows), n) + 1}: has {len(rows)} lines but "
                               f"{text_path.name} has {n}; the files must be aligned line by line")
    dialogues: list[Dialogue] = []
    short: list[int] = []
    for i, (t_line, a_line, e_line) in enumerate(zip(texts, acts, emos), start=1):
        if not t_line.strip() and not a_line.strip() and not e_line.strip():
            continue
        parts = t_line.split(EOU)
        if parts and not parts[-1].strip():
            parts.pop()  # the line ends with __eou__
        utts = [p.strip() for p in parts]
        where = f"{text_path} line {i}"
        if not utts:
            raise DeltakdError(f"{where}: no utterances")
        for j, u in enumerate(utts, start=1):
            if not u:
                raise DeltakdError(f"{where}: utterance {j} is empty")
        a = _labels(a_line, ACTS, 1, f"{act_path} line {i}", "act")
        e = _labels(e_line, EMOTIONS, 0, f"{emotion_path} line {i}", "emotion")
        if len(a) == len(e) == len(utts) - 1 and len(a) >= 1:
            short.append(i)
            if short_labels == "drop_dialogue":
                continue
            utts = utts[:-1]
        elif len(a) != len(utts):
            raise DeltakdError(f"{act_path} line {i}: {len(a)} act labels for {len(utts)} utterances "
                               f"in {text_path.name}")
        elif len(e) != len(utts):
            raise DeltakdError(f"{emotion_path} line {i}: {len(e)} emotion labels for {len(utts)} "
                               f"utterances in {text_path.name}")
        dialogues.append([Turn(u, act, emo) for u, act, emo in zip(utts, a, e)])
    if short:
        shown = ", ".join(map(str, short[:10])) + (" ..." if len(short) > 10 else "")
        what = "them" if short_labels == "drop_dialogue" else "their last turn"
        warning(__name__, "%s: %d dialogue(s) have one act/emotion label fewer than utterances (line(s) %s); "
                       "dropped %s", text_path, len(short), shown, what)
    stats = ReadStats(len(dialogues), sum(map(len, dialogues)), tuple(short))
    return dialogues, stats


def read_dailydialog(data_dir: Path, split: str, short_labels: ShortLabels = "drop_dialogue") -> list[Dialogue]:
    """Dialogues of one split of a DailyDialog folder (original layout or ``data/dailydialog_sample``)."""
    return read_dailydialog_files(*split_files(Path(data_dir), split), short_labels=short_labels)[0]


# ---- act-controlled response examples ------------------------------------------------------------

@dataclass(frozen=True)
class ResponseExample:
    """One response turn with the act it should have and up to ``context_turns`` preceding turns."""

    act: str
    context: tuple[str, ...]  # oldest first
    response: str
    emotion: str = "no_emotion"
    dialogue: int = 0  # index of the dialogue in its split
    turn: int = 1  # index of the response turn in its dialogue (>= 1)

    def label(self, control: str) -> str:
        """The response's label under a control signal: its act or its emotion."""
        return self.emotion if control == "emotion" else self.act

    def with_label(self, control: str, label: str) -> "ResponseExample":
        """The same example asked for another label of the control signal."""
        return replace(self, emotion=label) if control == "emotion" else replace(self, act=label)


def response_examples(dialogues: Sequence[Dialogue], context_turns: int = 3) -> list[ResponseExample]:
    """One example per turn with index >= 1; the context is the previous ``context_turns`` turns."""
    if context_turns < 1:
        raise DeltakdError(f"context_turns must be >= 1, got {context_turns}")
    out = []
    for d, dialogue in enumerate(dialogues):
        for t in range(1, len(dialogue)):
            ctx = tuple(turn.text for turn in dialogue[max(0, t - context_turns):t])
            out.append(ResponseExample(dialogue[t].act, ctx, dialogue[t].text, dialogue[t].emotion, d, t))
    return out


@dataclass(frozen=True)
class DialogueFormat:
    """How examples become token sequences.

    ``max_length`` bounds every sequence (keep it <= the model's ``n_positions``). A response
    longer than ``max_response_tokens`` keeps its first ``max_response_tokens`` tokens, then eos
    (so generation should allow ``max_response_tokens + 1`` new tokens). The context is cut from
    the left to fit: oldest whole turns go first; if the newest turn alone does not fit, its
    rightmost tokens are kept. The act and the (capped) response are always kept. With
    ``act_tokens`` the act is the single added token :func:`act_token` (the tokenizer must have it).
    ``control`` names the signal in the act's place: the response turn's act or its emotion.
    """

    act_position: ActPosition = "first"
    max_length: int = 256
    max_response_tokens: int = 64
    act_tokens: bool = False  # the act is one added token (act_token) instead of the act word's pieces
    control: Control = "act"

    def __post_init__(self) -> None:
        control_labels(self.control)
        if self.act_position not in ACT_POSITIONS:
            raise DeltakdError(f"act_position '{self.act_position}' is unknown; valid: {', '.join(ACT_POSITIONS)}")
        if self.max_response_tokens < 1:
            raise DeltakdError(f"max_response_tokens must be >= 1, got {self.max_response_tokens}")
        if self.max_length < 4:
            raise DeltakdError(f"max_length must be >= 4, got {self.max_length}")

    def check_model(self, config: Any) -> None:
        """Fail when ``max_length`` exceeds the model's position limit (``n_positions`` and kin)."""
        limit = model_max_positions(config)
        if limit is not None and self.max_length > limit:
            raise DeltakdError(f"max_length {self.max_length} exceeds the model's {limit} positions")


def model_max_positions(config: Any) -> int | None:
    """The model's position limit from a transformers config (``n_positions``, ``max_position_embeddings``)."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _Encoder:
    """Tokenises each distinct string once (segments never get special tokens)."""

    def __init__(self, tokenizer: Any) -> None:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DeltakdError("the tokenizer has no eos token; dialogue examples need one")
        self.tokenizer, self.eos = tokenizer, int(eos)
        self._ids: dict[str, list[int]] = {}

    def prime(self, texts: Iterable[str]) -> None:
        new = list(dict.fromkeys(t for t in texts if t not in self._ids))
        for i in range(0, len(new), 2000):
            chunk = new[i:i + 2000]
            enc = self.tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            self._ids.update(zip(chunk, enc))

    def __call__(self, text: str) -> list[int]:
        if text not in self._ids:
            self.prime([text])
        return self._ids[text]

    def prime_examples(self, examples: Sequence[ResponseExample], with_response: bool,
                       control: str = "act") -> None:
        texts: list[str] = []
        for ex in examples:
            texts.append(ex.label(control))
            texts.extend(ex.context)
            if with_response:
                texts.append(ex.response)
        self.prime(texts)


def _context_ids(turns: Sequence[list[int]], budget: int, eos: int) -> list[int]:
    """Newest turns (each + eos) that fit in ``budget`` tokens, oldest dropped first."""
    kept: list[list[int]] = []
    used = 0
    for ids in reversed(turns):
        if used + len(ids) + 1 <= budget:
            kept.append(ids + [eos])
            used += len(ids) + 1
            continue
        if not kept and budget - used >= 2:  # the newest turn alone is too long: keep its right end
            kept.append(ids[len(ids) - (budget - used - 1):] + [eos])
        break
    return [t for ids in reversed(kept) for t in ids]


def _prompt_ids(act_seg: list[int], context: list[int], position: ActPosition) -> list[int]:
    return act_seg + context if position == "first" else context + act_seg


def _act_segment(enc: _Encoder, ex: ResponseExample, fmt: DialogueFormat, reserve: int) -> list[int]:
    """The control label's ids as they enter the prompt (the act, or the emotion with
    ``control="emotion"``): followed by eos, except when the label opens the response."""
    label = ex.label(fmt.control)
    text = act_token(label) if fmt.act_tokens else label
    act = enc(text)
    if fmt.act_tokens and (len(act) != 1 or act[0] == enc.tokenizer.unk_token_id):
        raise DeltakdError(f"the tokenizer has no {fmt.control} token {text!r} (act_tokens: true needs the "
                           f"{fmt.control} tokens added, as prepare_dialogue does)")
    if not act:
        raise DeltakdError(f"{fmt.control} {label!r} tokenises to nothing")
    seg = act if fmt.act_position == "opens_response" else act + [enc.eos]
    if len(seg) + reserve > fmt.max_length:
        raise DeltakdError(f"max_length {fmt.max_length} cannot hold the {fmt.control} {label!r} "
                           f"({len(seg)} tokens) and a response of {reserve - 1} token(s) + eos")
    return seg


def encode_response_example(ex: ResponseExample, tokenizer: Any, fmt: DialogueFormat,
                            _enc: _Encoder | None = None) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 except on the response and its eos).

    The response is capped at ``fmt.max_response_tokens`` (right cut) and further at what
    ``fmt.max_length`` leaves after the act; the context fills the rest from the right.
    """
    enc = _enc or _Encoder(tokenizer)
    eos = enc.eos
    act = _act_segment(enc, ex, fmt, 2)
    room = fmt.max_length - len(act) - 1  # the response's eos
    response = enc(ex.response)[:min(fmt.max_response_tokens, room)] + [eos]
    context = _context_ids([enc(t) for t in ex.context], fmt.max_length - len(act) - len(response), eos)
    prompt = _prompt_ids(act, context, fmt.act_position)
    ids = prompt + response
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [IGNORE_INDEX] * len(prompt) + response}


def encode_response_examples(examples: Sequence[ResponseExample], tokenizer: Any,
                             fmt: DialogueFormat) -> list[dict[str, list[int]]]:
    """:func:`encode_response_example` over many examples, tokenising each distinct string once."""
    enc = _Encoder(tokenizer)
    enc.prime_examples(examples, with_response=True, control=fmt.control)
    return [encode_response_example(ex, tokenizer, fmt, enc) for ex in examples]


def full_lengths(examples: Sequence[ResponseExample], tokenizer: Any, fmt: DialogueFormat) -> list[int]:
    """Tokens of each example with nothing cut: its label segment, every context turn + eos, the
    whole response + eos (what :func:`encode_response_example` makes when it fits ``fmt.max_length``
    and the response fits ``fmt.max_response_tokens``)."""
    enc = _Encoder(tokenizer)
    enc.prime_examples(examples, with_response=True, control=fmt.control)
    return [len(_act_segment(enc, ex, fmt, 0)) + sum(len(enc(t)) + 1 for t in ex.context) + len(enc(ex.response)) + 1
            for ex in examples]


def drop_long_examples(examples: Sequence[ResponseExample], tokenizer: Any, fmt: DialogueFormat
                       ) -> list[ResponseExample]:
    """The examples whose whole encoding (:func:`full_lengths`) fits ``fmt.max_length``, in order."""
    return [ex for ex, n in zip(examples, full_lengths(examples, tokenizer, fmt)) if n <= fmt.max_length]


def encode_generation_prompts(examples: Sequence[ResponseExample], tokenizer: Any,
                              fmt: DialogueFormat) -> list[list[int]]:
    """Prompt ids: everything before the response (up to its eos, or the act that opens it).

    The context is cut as in training but leaves room for ``max_response_tokens + 1`` new tokens,
    so prompt + generation stays within ``fmt.max_length``.
    """
    enc = _Encoder(tokenizer)
    enc.prime_examples(examples, with_response=False, control=fmt.control)
    reserve = fmt.max_response_tokens + 1
    out = []
    for ex in examples:
        act = _act_segment(enc, ex, fmt, reserve)
        context = _context_ids([enc(t) for t in ex.context], fmt.max_length - len(act) - reserve, enc.eos)
        out.append(_prompt_ids(act, context, fmt.act_position))
    return out


def response_from_generation(new_ids: Sequence[int], tokenizer: Any) -> str:
    """Decoded text of generated ids up to (not including) the first eos, stripped."""
    eos = tokenizer.eos_token_id
    ids = list(new_ids)
    if eos is not None and eos in ids:
        ids = ids[:ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# ---- collation -----------------------------------------------------------------------------------

@dataclass
class DialogueCollator:
    """Pads ``input_ids`` (pad id), ``attention_mask`` (0) and ``labels`` (-100) to the batch's longest.

    ``padding_side="right"`` for training, ``"left"`` for batched generation (prompts without labels).
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise DeltakdError(f"padding_side '{self.padding_side}' is unknown; valid: right, left")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DeltakdError("cannot collate an empty batch")
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        keys = [k for k in fill if k in features[0] or k == "attention_mask"]
        batch: dict[str, list[list[int]]] = {k: [] for k in keys}
        for f in features:
            ids = list(f["input_ids"])
            for k in keys:
                row = list(f[k]) if k in f else [1] * len(ids)
                pad = [fill[k]] * (length - len(row))
                batch[k].append(row + pad if self.padding_side == "right" else pad + row)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}  # (B, L)


def generation_batch(prompts: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids``/``attention_mask`` for ``model.generate``."""
    return DialogueCollator(pad_token_id, "left")([{"input_ids": list(p)} for p in prompts])


# ---- act-classifier data ---------------------------------------------------------------------------

def utterance_examples(dialogues: Iterable[Dialogue], dedupe: bool = False,
                       control: Control = "act") -> list[tuple[str, str]]:
    """(text, act) for every utterance (``control="emotion"``: (text, emotion)); ``dedupe`` keeps
    the first of identical pairs."""
    control_labels(control)
    out = [(" ".join(t.text.split()), t.emotion if control == "emotion" else t.act) for d in dialogues for t in d]
    return list(dict.fromkeys(out)) if dedupe else out


def write_act_task(examples: Sequence[tuple[str, str]], path: Path) -> Path:
    """Write (text, act) rows as ``.tsv`` (header ``text<TAB>label``) or ``.jsonl`` (``{"text", "label"}``).

    The files read back with ``deltakd.data.readers.read_file`` as a custom task with
    ``text_columns: [text]``, ``label_column: label`` and ``labels: [inform, question, directive, commissive]``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".jsonl"):
        raise DeltakdError(f"{path}: act task files are .tsv or .jsonl")
    rows: Iterator[str]
    clean = [(" ".join(text.split()), act) for text, act in examples]  # no tabs or newlines in a cell
    if suffix == ".tsv":
        rows = (f"{t}\t{a}\n" for t, a in clean)
        head = "text\tlabel\n"
    else:
        rows = (json.dumps({"text": t, "label": a}, ensure_ascii=False) + "\n" for t, a in clean)
        head = ""
    atomic_write_text(path, head + "".join(rows))
    return path
