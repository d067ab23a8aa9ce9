"""matplotlib for the pictures that tasks, sweeps and analyses write: a leaf module, so that any
layer may draw without importing the layers above it."""


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
