r"""Is the Transformer's lead over the recurrent encoder-decoder the architecture's or the
baseline's? The Transformer, the textbook's GRU encoder-decoder with additive attention and
Bahdanau et al.'s bidirectional one, each with three learning rates, at an equal training-time
budget (about 25 minutes of 2 CPU cores each, evaluation included) on the shipped pairs.

    python launch.py --config experiments/translate_compare.py --workdir runs/compare --sweep
    python launch.py --config experiments/translate_compare.py --workdir runs/compare \
        --mode summarize    # compare.md, compare.png again

The budget is a step count per model (`MODELS`), measured on 2 CPU cores: a recurrent step
costs more than a Transformer step (a sequential scan), a bidirectional one more again. All
three share the data, batch, dropout, warmup and schedule (translate.py's, dropout 0.1 and 100
warmup steps for all) and evaluate every 100 steps (greedy BLEU on 500 validation pairs, with
the training time so far in metrics.jsonl). The summary (`seqjax.analysis.translation_compare`)
picks each model's learning rate by its final validation BLEU and reports its test BLEU and
how well its cross-attention aligns (`test_alignment`, 30 hand-aligned test pairs). The last
points (`LONGER`) train the aligning recurrent model (the bidirectional GRU) and the Transformer,
each at its best rate, for 3 times the budget: does more time close the gap?
Arguments after the colon: `tiny` (seconds, for tests).
"""

import os

from seqjax.analysis import translation_compare
from seqjax.config import load_experiment, parse_arg

BUDGET_MINUTES = 25.0
GRU = {"model.name": "seq2seq_attention", "model.cell": "gru"}
# label: (what the model is, steps of about 25 minutes, learning rates). The Transformer's
# 1,100 steps are 25 minutes alone on 2 CPU cores (README); the others' costs per step relative
# to it are 1.29 and 1.57 (python benchmarks/translate_budget.py, results/translate_budget_cpu.txt).
MODELS = {
    "transformer": ({"model.name": "transformer"}, 1100, (1e-3, 2e-3, 4e-3)),
    "gru": (dict(GRU, **{"model.bidirectional": False}), 850, (2e-3, 5e-3, 1e-2)),
    "bigru": (dict(GRU, **{"model.bidirectional": True}), 700, (2e-3, 5e-3, 1e-2)),
}
# (model, times its budget, learning rate), run last: the bidirectional GRU, the one recurrent
# model whose attention aligns, and the Transformer, each at its best rate in the budget (chosen
# from the first nine points).
LONGER = (("bigru", 3, 5e-3), ("transformer", 3, 4e-3))


def get_config(arg=None):
    args = parse_arg(arg, tiny=False)
    translate = load_experiment(os.path.join(os.path.dirname(__file__), "translate.py"))
    config = translate.get_config("tiny" if args.tiny else None)
    with config.unlocked():
        config.model.dropout = 0.1
        config.opt.warmup_steps = 100
        config.eval_every = config.checkpoint_every = 100
        config.keep_checkpoints = 1
        if args.tiny:
            config.opt.warmup_steps = 1
            config.eval_every = config.checkpoint_every = 2
    return config


def points(models=None, steps=None, longer=LONGER) -> list:
    """Every model x its learning rates, the middle rate of every model first (so that a sweep
    cut short still compares the three), then `longer`; `steps` (for tests) replaces each
    model's budget."""
    models = models or MODELS
    ranks = sorted(range(max(len(rates) for _, _, rates in models.values())),
                   key=lambda i: (i != 1, i))
    out = [{**what, "num_train_steps": steps or budget, "opt.lr": rates[i]}
           for i in ranks for what, budget, rates in models.values() if i < len(rates)]
    for label, times, lr in longer:
        what, budget, _ = models[label]
        out.append({**what, "num_train_steps": (steps or budget) * times, "opt.lr": lr})
    return out


def get_sweep():
    return points()


def summarize_sweep(rows, workdir):
    translation_compare.write(rows, workdir, {k: what for k, (what, _, _) in MODELS.items()},
                              BUDGET_MINUTES)
    return "compare.md"
