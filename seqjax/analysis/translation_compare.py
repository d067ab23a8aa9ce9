"""Translation models compared at an equal training-time budget, from the points of
experiments/translate_compare.py's sweep (model x learning rate).

Each model's best point is the learning rate with the highest validation BLEU (greedy, on
`decode.val_sentences` validation pairs) at the end of its run; its test BLEU (greedy and beam)
and the alignment score of its cross-attention (`seqjax.tasks.cross_attention`) are those of
the same final parameters, so the test pairs choose nothing. `write(rows, workdir, models,
budget_minutes)` writes `compare.md` / `compare.csv` (every point, best ones marked, with the
training time each run measured) and `compare.png` (validation BLEU against training time, one
line per point: the best learning rate of each model solid, the others faint).

A model's budget is the fewest steps among its points; a point of the same model with more
steps (`budget` = its steps / the budget, e.g. 3) shows what more time buys: it is plotted
beyond the budget and never chosen as the model's best.

The plot's time is the budget's: step / num_train_steps x `budget_minutes`, each model's
steps having been set to fill the budget from its measured cost per step (benchmarks/
translate_budget.py). A run's own clock (`train_min`) counts whatever else the machine was
doing, and a sweep's runs do not all meet the same load; the table shows it beside the budget.
"""

import os

from seqjax import files, plotting
from seqjax.train.metrics import METRICS_FILE, read_metrics

COLUMNS = ["model", "lr", "budget", "steps", "best", "train_min", "val_bleu", "test_bleu_greedy",
           "test_bleu_beam", "test_alignment", "status"]


def curve(subdir: str) -> list[tuple[int, float, float]]:
    """(step, training minutes measured, validation BLEU) of each evaluation of a point's run."""
    if not files.exists(os.path.join(subdir, METRICS_FILE)):
        return []
    return [(r["step"], r["train_time_s"] / 60, r["bleu"]) for r in read_metrics(subdir, "val")
            if "bleu" in r and "train_time_s" in r]


def table(rows: list[dict], models: dict, curves: dict) -> list[dict]:
    """One row per point: `models` maps a model's label to its overrides, which name the
    point's model; `curves` maps a point to its `curve`, whose last evaluation (before the test
    pairs are decoded) gives train_min; the best point of each model within its budget gets
    best='yes'."""
    out = []
    for row in rows:
        label = next((name for name, overrides in models.items()
                      if all(row.get(k) == v for k, v in overrides.items())), None)
        if label is None:
            continue
        beam = next((v for k, v in row.items() if k.startswith("val_test_bleu_beam")), None)
        line = curves.get(row["point"])
        out.append(dict(model=label, lr=row.get("opt.lr"), steps=row.get("step"),
                        train_min=line[-1][1] if line else None,
                        val_bleu=row.get("val_bleu"),
                        test_bleu_greedy=row.get("val_test_bleu_greedy"), test_bleu_beam=beam,
                        test_alignment=row.get("val_test_alignment"), status=row["status"],
                        best="", budget=None, point=row["point"],
                        budget_steps=row.get("num_train_steps")))
    for label in models:
        mine = [r for r in out if r["model"] == label and r["budget_steps"]]
        fewest = min((r["budget_steps"] for r in mine), default=None)
        for r in mine:
            r["budget"] = r["budget_steps"] / fewest
    out.sort(key=lambda r: (list(models).index(r["model"]), r["budget"] or 1, r["lr"] or 0))
    for label in models:
        done = [r for r in out if r["model"] == label and r["status"] == "ok"
                and r["val_bleu"] is not None and (r["budget"] or 1) == 1]
        if done:
            max(done, key=lambda r: r["val_bleu"])["best"] = "yes"
    return out


def write(rows: list[dict], workdir: str, models: dict, budget_minutes: float) -> list[dict]:
    """compare.md, compare.csv and compare.png of the sweep's rows."""
    curves = {row["point"]: curve(os.path.join(workdir, row["point"])) for row in rows}
    points = table(rows, models, curves)
    files.write_csv(os.path.join(workdir, "compare.csv"), points,
                    COLUMNS + ["budget_steps", "point"])
    formats = {k: "{:.1f}" for k in ("train_min", "val_bleu", "test_bleu_greedy",
                                     "test_bleu_beam")}
    files.write_from_process_0(os.path.join(workdir, "compare.md"), plotting.markdown_table(
        points, COLUMNS, dict(formats, lr="{:g}", budget="{:g}x", test_alignment="{:.3f}")))
    _plot(points, curves, workdir, list(models), budget_minutes)
    return points


def _plot(points: list[dict], curves: dict, workdir: str, labels: list[str],
          budget_minutes: float):
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = dict(zip(labels, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for p in points:
        line = curves[p["point"]]
        if not line or not p["budget_steps"]:
            continue
        best = p["best"] == "yes"
        longer = p["budget"] > 1
        per_step = budget_minutes * p["budget"] / p["budget_steps"]
        ax.plot([step * per_step for step, _, _ in line], [bleu for _, _, bleu in line],
                color=colors[p["model"]], marker="o" if best else None,
                alpha=1.0 if best or longer else 0.35,
                linestyle=":" if longer else "-" if best else "--",
                label=f"{p['model']}, lr {p['lr']:g}" + (" (best)" if best else "")
                + (f", {p['budget']:g}x the time" if longer else ""))
    if any((p["budget"] or 1) > 1 for p in points):
        ax.axvline(budget_minutes, color="0.6", linewidth=0.8)
    plotting.save_lines(fig, ax, os.path.join(workdir, "compare.png"), legend_size=7,
                        xlabel=f"training time, minutes (the budget: {budget_minutes:g})",
                        ylabel="validation BLEU (greedy)")
