"""Results tables for the terminal (rich) and for files (markdown)."""

from __future__ import annotations

from typing import Any, Mapping

from rich.console import Console
from rich.table import Table


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def results_table(results: dict[str, Any]) -> Table:
    """One row per split with its metrics, then parameters and speed."""
    metrics = results.get("metrics", {})
    names = sorted({k for m in metrics.values() for k in m if k != "loss"}) + ["loss"]
    table = Table(title=f"{results.get('name', 'run')}  ({results.get('run_dir', '')})")
    table.add_column("split")
    for n in names:
        table.add_column(n, justify="right")
    for split, m in metrics.items():
        table.add_row(split, *[_fmt(m.get(n, "")) for n in names])
    return table


def print_results(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(results_table(results))
    p = results.get("params", {})
    if p:
        console.print(f"parameters: {p['total']:,} total, {p['trainable']:,} trainable "
                      f"({p['trainable_pct']:.2f}%)   train: {results.get('train_samples_per_second', 0):.1f} "
                      f"samples/s, wall time {results.get('wall_time_s', 0) / 60:.1f} min")
    d = results.get("distill")
    if d and d.get("teacher_metrics"):
        console.print(teacher_student_table(results))


def teacher_student_rows(results: Mapping[str, Any]) -> tuple[str, list[str], list[list[str]], str] | None:
    """Teacher vs student on the same split, as plain cells: (split, headers, rows, caption);
    None for a run without a teacher comparison. Metrics: the main one first, then the others both have."""
    d = results.get("distill")
    if not d or not d.get("teacher_metrics"):
        return None
    split, t_metrics = next(iter(d["teacher_metrics"].items()))
    s_metrics = results["metrics"].get(split, {})
    main = results.get("main_metric") or next(iter(s_metrics), "loss")
    if main not in s_metrics:
        main = "perplexity" if "perplexity" in s_metrics else "loss"
    others = [k for k in s_metrics if k in t_metrics and k != main]
    names = [main, *others]
    headers = ["model", *names, "parameters", "eval samples/s"]
    rows = [["teacher", *[_fmt(t_metrics.get(n, float("nan"))) for n in names], _fmt(d["teacher_params"]),
             f"{d['teacher_eval_samples_per_second']:.1f}"],
            ["student", *[_fmt(s_metrics.get(n, float("nan"))) for n in names], _fmt(results["params"]["total"]),
             f"{results.get('eval_samples_per_second', float('nan')):.1f}"]]
    t_main = t_metrics.get(main)
    ratio = f"{100 * s_metrics[main] / t_main:.1f}% of the teacher's {main}, " if t_main and main in s_metrics else ""
    caption = (f"student: {ratio}{d['teacher_params'] / results['params']['total']:.2f}x fewer parameters, "
               f"{d['speedup']:.2f}x faster")
    return split, headers, rows, caption


def teacher_student_table(results: Mapping[str, Any]) -> Table:
    """Teacher vs student on the same split: metrics, parameters, evaluation speed."""
    split, headers, rows, caption = teacher_student_rows(results)
    table = Table(title=f"teacher vs student ({split})")
    for col in headers:
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in rows:
        table.add_row(*row)
    table.caption = caption
    return table
