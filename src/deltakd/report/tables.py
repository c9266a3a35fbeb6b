"""Results tables for the terminal (rich) and for files (markdown)."""

from __future__ import annotations

from typing import Any

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
