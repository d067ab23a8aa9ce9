"""Downstream accuracy against pretraining compute, from the points of a transfer sweep
(experiments/bert_transfer.py): each point fine-tunes (or probes) the encoder that a pretraining
run kept at `init_from_step` (0: the same model and tokenizer, untrained) on `data.max_examples`
labelled sentences, with one learning rate and one seed.

A point's result is the validation accuracy at its evaluation with the lowest validation loss
(early stopping on the validation split, which is also what is reported: SST-2's test labels
are not public). For each arm (pretraining step, regime, label count) the learning rate with the
best mean over seeds is chosen; the arm's cell is that mean and the standard deviation over the
seeds (`ddof=1`); it `pays` where its gain over step 0 is at least `MIN_GAIN` and more than
twice the larger spread of the two arms. `write(rows, workdir)` writes `transfer.md`,
`transfer.csv` and `transfer.png` (accuracy against pretraining steps, one line per label
count and regime).
"""

import os
import statistics

from seqjax import files, plotting
from seqjax.train.metrics import METRICS_FILE, read_metrics

# Pretraining steps of the curve: about 0, 10, 30, 60 and 120 minutes of experiments/
# bert_pretrain.py's default model on 2 CPU cores (6,000 steps took 41.8 minutes).
PRETRAIN_STEPS = (0, 1500, 4500, 9000, 18000)
# Where pretraining pays: a gain over step 0 of at least MIN_GAIN and more than twice the
# larger spread over seeds of the two arms.
MIN_GAIN = 0.03
STEP, FROZEN, LABELS, LR = ("init_from_step", "model.freeze_encoder", "data.max_examples",
                            "opt.lr")


def point_accuracy(subdir: str) -> float | None:
    """Validation accuracy at the evaluation with the lowest validation loss, or None."""
    if not files.exists(os.path.join(subdir, METRICS_FILE)):
        return None
    evaluations = [r for r in read_metrics(subdir, "val") if "accuracy" in r]
    return min(evaluations, key=lambda r: r["loss"])["accuracy"] if evaluations else None


def arms(rows: list[dict], workdir: str) -> list[dict]:
    """One row per (pretraining step, regime, label count): the learning rate whose mean
    accuracy over seeds is best, that mean, its spread and the number of seeds."""
    runs: dict = {}
    for row in rows:
        accuracy = point_accuracy(os.path.join(workdir, row["point"]))
        if accuracy is not None and row.get("status") == "ok":
            key = (row[STEP], "probe" if row[FROZEN] else "fine-tune", row[LABELS])
            runs.setdefault(key, {}).setdefault(row[LR], []).append(accuracy)
    out = []
    for (step, regime, labels), by_lr in sorted(runs.items()):
        lr, scores = max(by_lr.items(), key=lambda item: statistics.mean(item[1]))
        out.append(dict(pretraining_step=step, regime=regime, labels=labels, lr=lr,
                        accuracy=statistics.mean(scores), seeds=len(scores),
                        spread=statistics.stdev(scores) if len(scores) > 1 else 0.0))
    return out


def write(rows: list[dict], workdir: str) -> list[dict]:
    """transfer.csv, transfer.md (with each arm's gain over step 0) and transfer.png."""
    table = arms(rows, workdir)
    scratch = {(a["regime"], a["labels"]): a for a in table if a["pretraining_step"] == 0}
    for a in table:
        base = scratch.get((a["regime"], a["labels"]))
        a["gain"] = None if base is None else a["accuracy"] - base["accuracy"]
        a["pays"] = "" if base is None or a is base else "yes" if (
            a["gain"] >= MIN_GAIN and a["gain"] > 2 * max(a["spread"], base["spread"])) else "no"
    keys = ["pretraining_step", "regime", "labels", "lr", "seeds", "accuracy", "spread", "gain",
            "pays"]
    files.write_csv(os.path.join(workdir, "transfer.csv"), table, keys)
    files.write_from_process_0(os.path.join(workdir, "transfer.md"), _by_step(table) + "\n" +
                               plotting.markdown_table(table, keys, {
                                   "gain": "{:+.3f}", "accuracy": "{:.3f}", "spread": "{:.3f}",
                                   "lr": "{:g}"}))
    _plot(table, workdir)
    return table


def _by_step(table: list[dict]) -> str:
    """The arms as a Markdown table of regime and label count (rows) by pretraining step
    (columns): 'mean ± spread', in bold where pretraining pays."""
    steps = sorted({a["pretraining_step"] for a in table})
    rows = {}
    for a in table:
        cell = f"{a['accuracy']:.3f} ± {a['spread']:.3f}"
        rows.setdefault((a["regime"], a["labels"]), {})[a["pretraining_step"]] = \
            f"**{cell}**" if a["pays"] == "yes" else cell
    head = ["regime", "labels"] + [f"step {step:,}" for step in steps]
    lines = [dict(zip(head, [regime, f"{labels:,}"] + [cells.get(s, "") for s in steps]))
             for (regime, labels), cells in sorted(rows.items())]
    return plotting.markdown_table(lines, head)


def _plot(table: list[dict], workdir: str):
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for regime, style in (("fine-tune", "-"), ("probe", "--")):
        for labels in sorted({a["labels"] for a in table}):
            line = [a for a in table if a["regime"] == regime and a["labels"] == labels]
            if line:
                ax.errorbar([a["pretraining_step"] for a in line],
                            [a["accuracy"] for a in line], [a["spread"] for a in line],
                            linestyle=style, marker="o", capsize=3,
                            label=f"{regime}, {labels:,} labels")
    plotting.save_lines(fig, ax, os.path.join(workdir, "transfer.png"),
                        xlabel="pretraining steps (0: untrained encoder)",
                        ylabel="SST-2 dev accuracy (mean, spread over seeds)",
                        legend_outside=True)
