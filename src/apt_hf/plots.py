"""Charts with matplotlib (the `plot` extra): loss curves, accuracy against speed, tokens kept against threshold.

Training and evaluation entry points draw them when matplotlib is installed and say how to get them when it is not;
patch-layout pictures stay in `visualization` (PIL), where tests check exact pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'apt-hf[plot]' (matplotlib)"


def matplotlib_available() -> bool:
    """Whether matplotlib imports here."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_line_chart(
    path: str | Path,
    series: dict[str, Sequence[tuple[float, float]]],
    title: str,
    x_label: str,
    y_label: str,
    point_labels: dict[str, Sequence[str]] | None = None,
) -> Path | None:
    """Draw one line per named series of (x, y) points, sorted by x, and save it as a PNG at `path`.

    `point_labels`: per series, one text per point (in the series' order), written beside it (e.g. the threshold
    setting of each accuracy-vs-speed point). Returns the path, or None (with a log line) without matplotlib.
    """
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("series: expected at least one (x, y) point, got none")
    for name, labels in (point_labels or {}).items():
        if len(labels) != len(series.get(name, ())):
            raise ValueError(f"point_labels: expected {len(series.get(name, ()))} labels for series {name!r}, "
                             f"got {len(labels)}")
    if not matplotlib_available():
        logger.warning("%s not drawn: %s", path, INSTALL_HINT)
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only; never opens a window
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.2, 4.2), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for name, values in series.items():
        labels = list((point_labels or {}).get(name, [""] * len(values)))
        placed = sorted(zip(values, labels, strict=True))
        xs, ys = [x for (x, _), _ in placed], [y for (_, y), _ in placed]
        axes.plot(xs, ys, marker="o", markersize=4, label=name)
        for x, y, text in zip(xs, ys, (t for _, t in placed), strict=True):
            if text:
                axes.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.set(title=title, xlabel=x_label, ylabel=y_label)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=9)
    path = Path(path)
    figure.savefig(path, format="png")
    return path


__all__ = ["INSTALL_HINT", "matplotlib_available", "save_line_chart"]
