"""Act- (or emotion-) controlled dialogue generation on DailyDialog: data (reader, examples, encoding), metrics;
recipe tasks (``tasks``), training preparation (``train``) and the generation evaluator (``evaluate``)
are imported from their modules."""

from __future__ import annotations

from ..data.dailydialog import (ACTS, CONTROLS, EMOTIONS, DialogueCollator, DialogueFormat, ReadStats,
                   ResponseExample, Turn, drop_long_examples, encode_generation_prompts, encode_response_example,
                   encode_response_examples, generation_batch, model_max_positions, read_dailydialog, read_dailydialog_files,
                   full_lengths, response_examples, response_from_generation, split_files, utterance_examples,
                   write_act_task)
from .metrics import control_accuracy, corpus_bleu, dialogue_metrics, distinct_n, empty_rate

__all__ = [
    "ACTS", "CONTROLS", "EMOTIONS", "DialogueCollator", "DialogueFormat", "ReadStats", "ResponseExample", "Turn",
    "control_accuracy", "corpus_bleu", "dialogue_metrics", "distinct_n", "drop_long_examples", "empty_rate",
    "encode_generation_prompts", "encode_response_example", "encode_response_examples", "full_lengths",
    "generation_batch",
    "model_max_positions", "read_dailydialog", "read_dailydialog_files", "response_examples",
    "response_from_generation", "split_files", "utterance_examples", "write_act_task",
]
