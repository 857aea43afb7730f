"""Plot helpers: matplotlib figures to PNG bytes / Markdown for Dagster metadata."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # headless; figures only go to bytes

import matplotlib.pyplot as plt  # noqa: E402


def figure_png(fig) -> bytes:
    """PNG bytes of a figure (closes it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def png_markdown(png: bytes, *, alt: str = "plot") -> str:
    """Inline Markdown image of PNG bytes (what Dagster's UI renders in asset metadata)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def figure_markdown(fig, *, alt: str = "plot") -> str:
    return png_markdown(figure_png(fig), alt=alt)
