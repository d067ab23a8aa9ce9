"""The files of the gradient-flow analysis (`seqjax.analysis.gradient_flow`): its CSV tables and
its plots of gradient norms against distance, the LRU's eigenvalues and the clipping runs."""


import numpy as np

from seqjax import plotting
from seqjax.nn.linear_recurrent import LINEAR_CELLS


def _panel(row):
    """Where a row is drawn: the LRU's rings at initialisation share a panel of their own; every
    other row goes to the panel of its state and recurrent scale."""
    if row["state"] == "init" and row["r_min"] is not None:
        return ("init", "rings")
    return (row["state"], row["recurrent_scale"])


def plot_gradient_flow(rows, path):
    plt = plotting.pyplot()
    panels = sorted({_panel(r) for r in rows},
                    key=lambda p: (p[0] == "trained", p[1] == "rings", 0 if p[1] == "rings"
                                   else p[1]))
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    colors = {cell: f"C{i}" for i, cell in enumerate(cells)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), sharey=True,
                             squeeze=False)
    for ax, panel in zip(axes[0], panels):
        lines = {}
        for r in rows:
            if _panel(r) == panel:
                ring = (r["r_min"], r["r_max"]) if panel[1] == "rings" else None
                lines.setdefault((r["cell"], ring), []).append((r["distance"], r["grad_norm"]))
        rings = sorted({ring for _, ring in lines if ring})
        for (cell, ring), points in lines.items():
            if ring:
                style = dict(label=f"{cell} ring [{ring[0]:g}, {ring[1]:g}]",
                             alpha=0.35 + 0.65 * (rings.index(ring) + 1) / len(rings))
            else:
                style = dict(label=cell)
            ax.semilogy(*zip(*points), color=colors[cell], **style)
        state, scale = panel
        if state == "trained":
            ax.set_title("trained")
        elif scale == "rings":
            ax.set_title("init, LRU by the ring of |lambda|")
        else:
            ax.set_title(f"init, W_h x {scale:g}" + (" (linear cells: unscaled)" if any(
                cell in LINEAR_CELLS for cell, _ in lines) else ""))
        ax.set_xlabel("distance T - t (steps)")
        ax.grid(alpha=0.3)
        if state == "trained" or scale == "rings":
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("||dL_T / dx_t||")
    fig.tight_layout()
    plotting.save(fig, path)


def plot_lru_eigenvalues(eigenvalues, linear, path):
    """The complex plane (unit circle, the initial ring of `linear`'s r_min and r_max shaded)
    and the sorted moduli, each layer's eigenvalues at initialisation and after training."""
    plt = plotting.pyplot()
    fig, (plane, moduli) = plt.subplots(1, 2, figsize=(10, 4.6))
    angle = np.linspace(0, 2 * np.pi, 400)
    plane.plot(np.cos(angle), np.sin(angle), color="black", lw=0.8)
    r_min, r_max = linear.r_min, linear.r_max
    plane.fill(np.concatenate([r_max * np.cos(angle), r_min * np.cos(angle[::-1])]),
               np.concatenate([r_max * np.sin(angle), r_min * np.sin(angle[::-1])]),
               color="C2", alpha=0.15, lw=0, label=f"initial ring [{r_min:g}, {r_max:g}]")
    layers = list(dict.fromkeys(layer for layer, _ in eigenvalues))
    for (layer, when), lam in eigenvalues.items():
        color = f"C{layers.index(layer)}" if len(layers) > 1 else (
            "C0" if when == "init" else "C3")
        style = dict(marker="o" if when == "init" else "x", color=color,
                     alpha=0.5 if when == "init" else 0.9)
        label = f"{layer}, {when}" if len(layers) > 1 else when
        plane.scatter(lam.real, lam.imag, s=12, label=label, **style)
        modulus = np.sort(np.abs(lam))
        moduli.plot(np.arange(len(modulus)), modulus, style["marker"], ms=3, label=label,
                    color=style["color"], alpha=style["alpha"])
    plane.set_aspect("equal")
    plane.set_xlim(-1.1, 1.1)
    plane.set_ylim(-1.1, 1.1)
    plane.set_xlabel("Re lambda")
    plane.set_ylabel("Im lambda")
    plane.set_title("LRU eigenvalues lambda")
    plane.legend(fontsize=7, loc="lower left")
    for r in (r_min, r_max):
        moduli.axhline(r, color="C2", ls="--", lw=0.8)
    moduli.axhline(1.0, color="black", lw=0.8)
    moduli.set_xlabel("eigenvalue, sorted by |lambda|")
    moduli.set_ylabel("|lambda|")
    moduli.set_title("moduli (dashed: the initial ring)")
    moduli.legend(fontsize=7)
    moduli.grid(alpha=0.3)
    fig.tight_layout()
    plotting.save(fig, path)


def plot_clipping(curves, c, path):
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for theta, (curve, error) in curves.items():
        label = f"clip_norm={theta:g}" if theta else "no clipping"
        if error:
            label += " (diverged)"
        if curve:
            ax.plot(*zip(*curve), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{c.cell}, SGD lr {c.lr:g}, recurrent init {c.recurrent_init}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plotting.save(fig, path)
