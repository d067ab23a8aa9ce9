"""matplotlib for the pictures that tasks, sweeps and analyses write: a leaf module, so that any
layer may draw without importing the layers above it."""

import io
import os

from seqjax import files


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: str, dpi: int = 120):
    """Writes `fig` to `path` (a local path or a URL; the format from its suffix) on process 0,
    then closes it. matplotlib renders into memory: it writes only to local files."""
    image = io.BytesIO()
    fig.savefig(image, format=os.path.splitext(path)[1][1:] or None, dpi=dpi)
    pyplot().close(fig)
    files.write_from_process_0(path, image.getvalue())
