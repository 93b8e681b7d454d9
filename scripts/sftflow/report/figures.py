"""Figures on matplotlib's Agg canvas (no pyplot, no global state), written atomically as PNG."""

from __future__ import annotations

import os

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sftflow.io import atomic_path

DPI = 100
WIDTH_INCHES = 10.0  # every plot is 1000 px wide; heights are set per plot


def new_figure(height_inches: float, nrows: int = 1, sharex: bool = False) -> tuple[Figure, list[Axes]]:
    """A figure WIDTH_INCHES x height_inches at DPI, with `nrows` stacked axes, drawn by the Agg backend."""
    fig = Figure(figsize=(WIDTH_INCHES, height_inches), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False)[:, 0]
    return fig, list(axes)


def save_png(fig: Figure, path: str | os.PathLike) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
