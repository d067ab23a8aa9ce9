"""matplotlib for the pictures that tasks, sweeps and analyses write, and their Markdown tables:
a leaf module, so that any layer may draw without importing the layers above it."""

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


def save_lines(fig, ax, path: str, *, xlabel: str, ylabel: str, legend_size: int = 8,
               legend_outside: bool = False):
    """Labels, a light grid and a legend (if anything was drawn; `legend_outside`: right of
    the axes, where it hides no line) on a line plot, then `save`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=legend_size, **dict(loc="upper left", bbox_to_anchor=(1.01, 1))
                  if legend_outside else {})
    fig.tight_layout()
    save(fig, path)


def markdown_table(rows: list[dict], keys: list[str], formats: dict | None = None) -> str:
    """A Markdown table of `rows` in the columns `keys`; `formats` maps a column to a format
    string ('{:+.3f}'), else floats show 4 significant digits and None an empty cell."""
    formats = formats or {}

    def cell(key, v):
        text = "" if v is None else formats[key].format(v) if key in formats else \
            f"{v:.4g}" if isinstance(v, float) else str(v)
        return " ".join(text.split()).replace("|", "\\|")

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(k, row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"
