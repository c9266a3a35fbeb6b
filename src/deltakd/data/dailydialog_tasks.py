"""A recipe's ``task`` section with ``dialogue:`` options -> DailyDialog data for each task kind.

- ``kind: dialogue``: act-controlled response examples (:func:`response_split`);
- ``kind: lm``: pre-training text, every turn one document, so the token stream is
  ``turn <eos> turn <eos> ...``, the same eos layout as the response examples (:func:`lm_texts`);
- ``kind: classification`` (default): utterances labelled with their act, or their emotion with
  ``dialogue.control: emotion`` (:func:`read_act_task`).

``dialogue.control: emotion`` makes the response turn's emotion the control signal of ``kind: dialogue``
in place of its act.

``task.data_dir`` is a DailyDialog folder in the original layout (``train/``, ``validation/``,
``test/``; see :func:`deltakd.data.dailydialog.split_files`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DeltakdError
from ..recipe.schema import DialogueOptions, TaskConfig
from .dailydialog import (
    Dialogue,
    DialogueFormat,
    ResponseExample,
    control_labels,
    read_dailydialog,
    response_examples,
    utterance_examples,
)
from .tasks import TaskSpec

# deltakd split name -> DailyDialog split name
RECIPE_SPLITS: dict[str, str] = {"train": "train", "valid": "validation", "test": "test"}


def options(cfg: TaskConfig) -> DialogueOptions:
    if cfg.dialogue is None:
        raise DeltakdError(f"task '{cfg.name}': a dialogue task needs a task.dialogue section")
    return cfg.dialogue


def data_dir(cfg: TaskConfig) -> Path:
    if cfg.data_dir is None or not Path(cfg.data_dir).is_dir():
        raise DeltakdError(f"task.data_dir: DailyDialog folder '{cfg.data_dir}' does not exist")
    return Path(cfg.data_dir)


def read_split(cfg: TaskConfig, split: str) -> list[Dialogue]:
    """Dialogues of a recipe split (``train``/``valid``/``test``), cut to ``max_dialogues``/``max_eval_dialogues``."""
    if split not in RECIPE_SPLITS:
        raise DeltakdError(f"split '{split}' is unknown; valid: {', '.join(RECIPE_SPLITS)}")
    opt = options(cfg)
    dialogues = read_dailydialog(data_dir(cfg), RECIPE_SPLITS[split], short_labels=opt.short_labels)
    limit = opt.max_dialogues if split == "train" else opt.max_eval_dialogues
    return dialogues[:limit] if limit else dialogues


def dialogue_format(cfg: TaskConfig, virtual_tokens: int = 0, positions: int | None = None) -> DialogueFormat:
    """The example format of a recipe; ``max_length`` plus ``virtual_tokens`` must fit ``positions``."""
    opt = options(cfg)
    if positions is not None and cfg.max_length + virtual_tokens > positions:
        extra = f" + {virtual_tokens} virtual tokens" if virtual_tokens else ""
        raise DeltakdError(f"task.max_length: {cfg.max_length}{extra} exceeds the model's {positions} positions; "
                           f"lower task.max_length to {positions - virtual_tokens}")
    if opt.max_response_tokens + 2 > cfg.max_length:
        raise DeltakdError(f"task.dialogue.max_response_tokens: {opt.max_response_tokens} (+ act and eos) does not "
                           f"fit task.max_length {cfg.max_length}")
    return DialogueFormat(opt.act_position, cfg.max_length, opt.max_response_tokens, opt.act_tokens, opt.control)


def response_split(cfg: TaskConfig, split: str) -> list[ResponseExample]:
    """One example per response turn of a split, with the last ``context_turns`` turns as context
    (only the turns whose act is in ``only_acts`` when that is set)."""
    opt = options(cfg)
    examples = response_examples(read_split(cfg, split), opt.context_turns)
    if opt.only_acts:
        examples = [ex for ex in examples if ex.act in opt.only_acts]
    return examples


def lm_texts(cfg: TaskConfig) -> dict[str, list[str]]:
    """Pre-training documents per split: every turn of every dialogue, in order.

    The causal-LM block builder puts eos after each document, so the stream reads
    ``turn <eos> turn <eos> ...`` exactly as the context of a response example does.
    """
    return {split: [t.text for d in read_split(cfg, split) for t in d] for split in RECIPE_SPLITS}


def read_act_task(cfg: TaskConfig):
    """(TaskSpec, raw splits) of the act classification task: every utterance, label = its act
    (its emotion with ``dialogue.control: emotion``)."""
    kind = cfg.kind or "classification"
    control = options(cfg).control
    labels = control_labels(control)
    if kind != "classification":
        raise DeltakdError(f"task.kind: a DailyDialog task is dialogue, lm or classification ({control}s), not {kind}")
    if cfg.labels is not None and tuple(cfg.labels) != labels:
        raise DeltakdError(f"task.labels: the DailyDialog {control}s are {list(labels)}; leave task.labels out")
    metrics = tuple(cfg.metrics) if cfg.metrics else ("accuracy", "f1")
    bad = [m for m in metrics if m not in ("accuracy", "f1", "matthews")]
    if bad:
        raise DeltakdError(f"task.metrics: {bad} do not apply to the {control} classification task; "
                           "allowed: accuracy, f1, matthews")
    spec = TaskSpec(cfg.name, "classification", labels, metrics, ("text",), "label",
                    {s: data_dir(cfg) / d for s, d in RECIPE_SPLITS.items()})
    raw = {split: [{"text_a": text, "text_b": None, "label": label}
                   for text, label in utterance_examples(read_split(cfg, split), control=control)]
           for split in RECIPE_SPLITS}
    return spec, raw
