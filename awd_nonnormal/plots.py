"""Every figure the project draws, with matplotlib's headless ``Agg`` backend.

Functions take plain numbers and tensors, draw one figure, save it as PNG and return the path.
matplotlib is imported lazily so that the rest of the package works without a display.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: PathLike) -> Path:
    """Save ``fig`` as a PNG (creating the folder) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    logger.info("wrote %s", path)
    return path
