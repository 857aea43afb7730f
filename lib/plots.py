"""Plot helpers: matplotlib figures to PNG bytes / Markdown for Dagster metadata.

Figures are built with matplotlib's object API on an Agg canvas (:func:`subplots`), never through
pyplot: nothing switches a global backend, matplotlib is imported only when a figure is made,
and plotting works headless wherever it runs (Dagster runs, Ray workers, threads).
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None,
             **kwargs: Any) -> tuple[Figure, Any]:
    """``(figure, axes)`` like ``pyplot.subplots``, on a figure of its own with an Agg canvas
    (not registered with pyplot, so nothing to close). ``kwargs`` go to ``Figure.subplots``
    (``squeeze``, ``sharex``, ``gridspec_kw``, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def figure_png(fig: Figure) -> bytes:
    """PNG bytes of a figure (a pyplot figure is closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    if getattr(fig.canvas, "manager", None) is not None:  # made by pyplot: drop it from pyplot's registry
        import matplotlib.pyplot as plt

        plt.close(fig)
    return buf.getvalue()


def png_markdown(png: bytes, *, alt: str = "plot") -> str:
    """Inline Markdown image of PNG bytes (what Dagster's UI renders in asset metadata)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def figure_markdown(fig: Figure, *, alt: str = "plot") -> str:
    return png_markdown(figure_png(fig), alt=alt)
