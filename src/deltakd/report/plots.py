"""Plots of runs as PNG bytes: learning curves (a panel per loss term) and bar charts with error bars.

matplotlib is used through its object API on the Agg canvas (no pyplot, no global backend
state), so plotting works headless and from any thread. It is optional (the ``report`` extra) and
imported on first use: runs and sweeps import this module, and only the charts need it.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import optional_import

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_DPI = 110


def require_matplotlib(needed_by: str = "plotting") -> None:
    """One line naming the ``report`` extra when matplotlib is missing."""
    optional_import("matplotlib", needed_by)


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Any]]:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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


def zoomed_limits(values: Sequence[float | None], errors: Sequence[float | None] | None = None
                  ) -> tuple[float, float] | None:
    """y limits around the data (with its error bars), not from zero: 0.86 vs 0.85 stays readable.

    Room above for the value labels; the lower limit stops at 0 for data that cannot go below it.
    None when there is no finite value.
    """
    errs = [_finite(e) for e in errors] if errors is not None else [0.0] * len(values)
    pts = [(v, e) for v, e in zip(values, errs) if v is not None and math.isfinite(v)]
    if not pts:
        return None
    lo, hi = min(v - e for v, e in pts), max(v + e for v, e in pts)
    pad = max(hi - lo, 0.02 * max(abs(lo), abs(hi)), 1e-6) * 0.25
    bottom = lo - pad
    if bottom < 0 <= min(v for v, _ in pts):
        bottom = 0.0
    return bottom, hi + 2 * pad


def bar_figure(labels: Sequence[str], series: dict[str, Sequence[float | None]],
               errors: dict[str, Sequence[float | None]] | None = None, ylabel: str = "",
               title: str = "", highlight: int | None = None) -> Figure:
    """Grouped bars: one group per label, one bar per series (e.g. valid, test), optional error bars.

    The y axis is zoomed to the data (``zoomed_limits``). ``highlight`` marks one group (the best
    setting) with a star under its label. Missing values (None / NaN) draw no bar.
    """
    errors = errors or {}
    n, k = len(labels), max(1, len(series))
    width = min(0.8 / k, 0.35)
    fig, (ax,) = _new_figure(max(5.0, 1.0 + 0.9 * n * max(1, k) * 0.6), 4.2)
    every: list[float | None] = []
    every_err: list[float | None] = []
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (k - 1) / 2) * width for i in range(n)]
        heights = [_finite(v) for v in values]
        err = errors.get(name)
        yerr = [_finite(e) for e in err] if err is not None else None
        every += list(values)
        every_err += list(err) if err is not None else [None] * len(values)
        bars = ax.bar(xs, heights, width=width, yerr=yerr, capsize=4 if yerr else 0, label=name)
        for b, v in zip(bars, values):
            if v is None or not math.isfinite(v):
                b.set_visible(False)
            else:
                ax.annotate(f"{v:.4g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    limits = zoomed_limits(every, every_err)
    if limits is not None:
        ax.set_ylim(*limits)
    shown = [f"★ {lab}" if i == highlight else lab for i, lab in enumerate(labels)]
    rotate = n > 3 or max(map(len, labels), default=0) > 14
    ax.set_xticks(range(n), shown, rotation=30 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def bar_chart(*args: Any, **kwargs: Any) -> bytes:
    """``bar_figure`` as PNG bytes."""
    return png_bytes(bar_figure(*args, **kwargs))


def curves_figure(panels: dict[str, dict[str, list[tuple[int, float]]]], ncols: int = 3) -> Figure:
    """One panel per title (a loss term, the evaluation metric), one line per run in each.

    ``panels`` maps a panel title to ``{run label: [(step, value)...]}``; terms of different
    objectives (a teacher's cross-entropy, a student's weighted distillation sum) are different
    panels, never one axis.
    """
    titles = list(panels) or ["training loss"]
    cols = min(ncols, len(titles))
    rows = math.ceil(len(titles) / cols)
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 * cols + 1.0, 3.3 * rows), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    runs = sorted({label for lines in panels.values() for label in lines})
    colors = {label: f"C{i % 10}" for i, label in enumerate(runs)}
    for i, title in enumerate(titles):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, pts in panels.get(title, {}).items():
            pts = sorted(pts)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None,
                        markersize=3, label=label, color=colors[label])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7 if len(ax.lines) <= 8 else 5, loc="best")
    return fig


def learning_curves(panels: dict[str, dict[str, list[tuple[int, float]]]]) -> bytes:
    """``curves_figure`` as PNG bytes."""
    return png_bytes(curves_figure(panels))
