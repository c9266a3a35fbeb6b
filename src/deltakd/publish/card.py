"""The model card deltakd writes as ``model/README.md`` of a run: what the model does and how it
was made (task, data, method, teacher, metrics per split, parameter counts, the resolved recipe)
and how to load it, with the Hub's metadata header (``huggingface_hub.ModelCard``).

Built from the run directory alone (``recipe.yaml``, ``model/deltakd_model.json``) and the run's
results, so ``deltakd push`` can render it again with the repository id in the snippets.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..runs import RunDir
from ..runs.rundir import read_recipe_data
from ..utils import atomic_write_text

CARD_FILE = "README.md"
META_FILE = "deltakd_model.json"  # models.delta.META_FILE: read here as plain JSON

_PIPELINES = {"single_label_classification": "text-classification", "regression": "text-classification",
              "causal_lm": "text-generation", "sentence_embedding": "sentence-similarity"}


def _meta(model_dir: Path) -> dict[str, Any]:
    """``deltakd_model.json``, or what a sentence-transformers folder (multistage) amounts to."""
    path = model_dir / META_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    if (model_dir / "modules.json").is_file():
        return {"format": "sentence-transformers", "problem_type": "sentence_embedding"}
    return {"format": "transformers", "problem_type": None}


def _is_hub_id(name: Any) -> bool:
    """A name the Hub's ``base_model`` field accepts: owner/name, not a local path."""
    return isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    names = list(dict.fromkeys(k for split in metrics.values() for k in split))
    if not names:
        return ["(no metrics)"]
    lines = ["| split | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for split, vals in metrics.items():
        lines.append(f"| {split} | " + " | ".join(_fmt(vals.get(n, "")) for n in names) + " |")
    return lines


def _multistage_lines(recipe: Mapping[str, Any]) -> list[str]:
    """A multistage stage: sentence-embedding distillation from a teacher, its losses and student structure."""
    losses = {k: v for k, v in (recipe.get("loss") or {}).items() if k in ("mse", "mcl", "ce", "bool") and v}
    student = {k: v for k, v in (recipe.get("student") or {}).items() if v not in (None, "auto")}
    return [f"- **Method**: multistage sentence-embedding distillation"
            + (f" (from stage `{recipe['init_from']}`)" if recipe.get("init_from") else ""),
            f"- **Teacher**: `{(recipe.get('teacher') or {}).get('model')}`",
            f"- **Distillation losses**: {', '.join(f'{k} × {v}' for k, v in losses.items()) or '-'}",
            *([f"- **Student**: {student}"] if student else [])]


def _method_lines(recipe: Mapping[str, Any], results: Mapping[str, Any]) -> list[str]:
    if recipe.get("family") == "multistage":
        return _multistage_lines(recipe)
    peft = recipe.get("peft") or {}
    method = peft.get("method", "full") if isinstance(peft, dict) else "full"
    settings = ", ".join(f"{k}={v}" for k, v in peft.items() if k != "method") if isinstance(peft, dict) else ""
    what = "full fine-tuning" if method == "full" else f"PEFT: {method}"
    lines = [f"- **Method**: {what}" + (f" ({settings})" if settings else "")]
    teacher = recipe.get("teacher")
    if teacher:
        source = teacher.get("model") or teacher.get("run") if isinstance(teacher, dict) else teacher
        lines.append(f"- **Teacher**: `{source}`")
        distill = recipe.get("distill") or {}
        if isinstance(distill, dict) and distill.get("losses"):
            losses = ", ".join(f"{k} × {v}" for k, v in distill["losses"].items())
            lines.append(f"- **Distillation losses**: {losses} (temperature {distill.get('temperature', '-')})")
        student = recipe.get("student") or {}
        if isinstance(student, dict) and student.get("from_teacher"):
            lines.append(f"- **Student**: built from the teacher's layers {student['from_teacher']}")
    d = results.get("distill")
    if isinstance(d, Mapping) and d.get("teacher_params"):
        lines.append(f"- **Teacher parameters**: {d['teacher_params']:,}; student speed-up "
                     f"×{_fmt(d.get('speedup', float('nan')))}")
    return lines


def _usage(meta: Mapping[str, Any], where: str) -> list[str]:
    fmt, problem = meta.get("format"), meta.get("problem_type")
    causal = problem == "causal_lm"
    if fmt == "sentence-transformers":
        code = ["from sentence_transformers import SentenceTransformer", "",
                f'model = SentenceTransformer("{where}")', 'embeddings = model.encode(["A sentence."])']
    elif fmt == "transformers":
        task = "text-generation" if causal else "text-classification"
        code = ["from transformers import pipeline", "", f'pipe = pipeline("{task}", model="{where}")',
                'print(pipe("The movie was wonderful."))']
    elif fmt == "peft":
        cls = "AutoPeftModelForCausalLM" if causal else "AutoPeftModelForSequenceClassification"
        code = [f"from peft import {cls}", "from transformers import AutoTokenizer", "",
                f'model = {cls}.from_pretrained("{where}")  # loads the base model named in adapter_config.json',
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")']
        if meta.get("merged"):
            code += ["", "# or the LoRA-merged plain model:", "from transformers import pipeline",
                     f'pipe = pipeline("text-classification", model="{where}", subfolder="{meta["merged"]}")']
    else:  # bottleneck adapters: deltakd's own format
        code = ["from deltakd import load_trained", "", f'model, tokenizer = load_trained("{where}")']
    lines = ["```python", *code, "```"]
    if not causal and fmt != "sentence-transformers":
        lines += ["", "With deltakd (any format; labels by name, with scores):", "", "```python",
                  "from deltakd import predict", "", f'print(predict("{where}", ["The movie was wonderful."]))',
                  "```"]
    return lines


def render_card(run: RunDir, results: Mapping[str, Any], repo_id: str | None = None) -> str:
    """The model card of a run's ``model/`` (``repo_id``: where the snippets load it from; default the folder)."""
    recipe = read_recipe_data(run) or {}
    meta = _meta(run.model_dir)
    task = recipe.get("task") or {}
    name = str(results.get("name") or recipe.get("name") or run.path.name)
    where = repo_id or "path/to/model"
    base = meta.get("base_model") or (recipe.get("model") or {}).get("name") or \
        (recipe.get("student") or {}).get("model") or (recipe.get("teacher") or {}).get("model")
    metrics: Mapping[str, Mapping[str, Any]] = results.get("metrics") or {}
    task_name = str(results.get("task") or task.get("name") or "")
    pipeline_tag = _PIPELINES.get(meta.get("problem_type") or "")
    evals = [EvalResult(task_type=pipeline_tag or "other", dataset_type=task_name or name,
                        dataset_name=task_name or name,
                        metric_type=m, metric_value=v, dataset_split=split)
             for split, vals in metrics.items() for m, v in vals.items()
             if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))]
    peft_method = (recipe.get("peft") or {}).get("method", "full") if isinstance(recipe.get("peft"), dict) else "full"
    tags = ["deltakd", *([] if peft_method == "full" else [peft_method]),
            *(["distillation"] if recipe.get("teacher") else [])]
    data = ModelCardData(
        library_name={"peft": "peft", "sentence-transformers": "sentence-transformers"}.get(meta.get("format"),
                                                                                          "transformers"),
        base_model=base if _is_hub_id(base) else None, tags=tags, pipeline_tag=pipeline_tag,
        model_name=name if evals else None, eval_results=evals or None)
    labels = meta.get("label_names") or meta.get("labels")
    params = results.get("params") or {}
    data_files = [f.get("path") if isinstance(f, dict) else f for f in (recipe.get("data") or {}).get("train", [])]
    source = (task["hf"].get("path") if isinstance(task.get("hf"), dict) else None) or task.get("data_dir") or \
        task.get("train_file") or ", ".join(map(str, data_files)) or None
    body = [f"# {name}", "", str(recipe.get("description") or "").strip() or "Trained with deltakd.", "",
            "## Model", "",
            f"- **Task**: {task_name or '-'} ({task.get('kind') or meta.get('problem_type') or 'classification'})",
            *([f"- **Labels** (id order): {', '.join(map(str, labels))}"] if labels else []),
            f"- **Data**: `{source}`" + (f"; examples per split: {dict(results.get('examples') or {})}"
                                         if results.get("examples") else ""),
            f"- **Base model**: `{base}`",
            *_method_lines(recipe, results),
            *([f"- **Parameters**: {params.get('total', 0):,} in all, {params.get('trainable', 0):,} trained "
               f"({_fmt(float(params.get('trainable_pct', float('nan'))))} %)"] if params else []),
            f"- **Saved as**: {meta.get('format')}", "",
            "## Results", "", f"Main metric: {results.get('main_metric') or '-'} (best checkpoint).", "",
            *_metrics_table(metrics), "",
            "## How to load", "", *_usage(meta, where), "",
            "## Recipe", "", "The resolved recipe this model was trained from (`deltakd train recipe.yaml`):", "",
            "```yaml", yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True).rstrip(), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)).content  # no template: text as it is


def write_card(run: RunDir, results: Mapping[str, Any], repo_id: str | None = None) -> Path:
    """Render the card into ``model/README.md`` (atomically; peft's or sentence-transformers' own replaced)."""
    path = run.model_dir / CARD_FILE
    atomic_write_text(path, render_card(run, results, repo_id))
    return path
