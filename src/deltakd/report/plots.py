"""Plots of runs as PNG bytes: learning curves and bar charts with error bars.

matplotlib is used through its object API on the Agg canvas (no pyplot, no global backend
state), so plotting works headless and from any thread.
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_DPI = 110


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _finite(v: float | None) -> float:
    return v if v is not None and math.isfinite(v) else 0.0


def bar_chart(labels: Sequence[str], series: dict[str, Sequence[float | None]],
              errors: dict[str, Sequence[float | None]] | None = None, ylabel: str = "",
              title: str = "", highlight: int | None = None) -> bytes:
    """Grouped bars: one group per label, one bar per series (e.g. valid, test), optional error bars.

    ``highlight`` marks one group (the best setting) with a star under its label.
    Missing values (None / NaN) draw no bar.
    """
    errors = errors or {}
    n, k = len(labels), max(1, len(series))
    width = min(0.8 / k, 0.35)
    fig, (ax,) = _new_figure(max(5.0, 1.0 + 0.9 * n * max(1, k) * 0.6), 4.2)
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (k - 1) / 2) * width for i in range(n)]
        heights = [_finite(v) for v in values]
        err = errors.get(name)
        yerr = [_finite(e) for e in err] if err is not None else None
        bars = ax.bar(xs, heights, width=width, yerr=yerr, capsize=4 if yerr else 0, label=name)
        for b, v in zip(bars, values):
            if v is None or not math.isfinite(v):
                b.set_visible(False)
            else:
                ax.annotate(f"{v:.4g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    shown = [f"★ {lab}" if i == highlight else lab for i, lab in enumerate(labels)]
    rotate = n > 3 or max(map(len, labels), default=0) > 14
    ax.set_xticks(range(n), shown, rotation=30 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return png_bytes(fig)


def learning_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], eval_label: str = "eval metric") -> bytes:
    """Two panels: training loss vs step, evaluation metric vs step; one line per run.

    ``curves`` maps a run label to ``{"loss": [(step, value)...], "eval": [(step, value)...]}``.
    """
    fig, (left, right) = _new_figure(11.0, 4.0, ncols=2)
    for label, c in curves.items():
        for ax, key, marker in ((left, "loss", None), (right, "eval", "o")):
            pts = sorted(c.get(key, []))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, markersize=3, label=label)
    left.set_title("training loss", fontsize=10)
    right.set_title(eval_label, fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if curves:
        right.legend(fontsize=7 if len(curves) <= 8 else 5, loc="best")
    return png_bytes(fig)
