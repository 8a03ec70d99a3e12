"""Figures written to files: the headless matplotlib set-up, layout, save and close in one place."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def saved_figure(path: Path, **subplots: Any) -> Iterator[Any]:
    """Yield the axes of ``plt.subplots(**subplots)`` (Agg backend); on exit lay out, save to ``path`` and close."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
