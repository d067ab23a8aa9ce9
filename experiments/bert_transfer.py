r"""Where BERT pretraining starts to pay: SST-2 dev accuracy against pretraining steps, fine-tuned
and as a linear probe on the frozen encoder, at 100, 1,000 and 5,000 labelled sentences.

    python launch.py --config experiments/bert_pretrain.py:curve --workdir runs/bert_curve
    python launch.py --config experiments/bert_transfer.py --workdir runs/transfer --sweep \
        --config.init_from=runs/bert_curve
    python launch.py --config experiments/bert_transfer.py --workdir runs/transfer \
        --mode summarize --config.init_from=runs/bert_curve    # transfer.md, transfer.png again

The first command is one pretraining run (experiments/bert_pretrain.py's model on WikiText-2)
that keeps its checkpoints at `PRETRAIN_STEPS` (about 10, 30, 60 and 120 minutes of 2 CPU
cores; resume it as often as need be). Each point of the sweep then trains from one of them
(`init_from_step`; 0 is the same model and tokenizer untrained: scratch) for the same number of
steps, with a learning rate from its regime's grid and a seed; the summary picks each arm's
best learning rate by its mean over seeds (`seqjax.analysis.transfer_curve`). The pretraining
run's learning-rate schedule spans all its steps, so an early checkpoint was not annealed.
Arguments after the colon are bert_finetune.py's (`size=`, `smoke`).
"""

import os

from seqjax import sweep
from seqjax.analysis import transfer_curve
from seqjax.config import load_experiment

PRETRAIN_STEPS = transfer_curve.PRETRAIN_STEPS
LABELS = (100, 1000, 5000)
SEEDS = (0, 1, 2)
# Wide enough that an arm's best rate is not at an end of its grid (a probe's features are
# fixed, so it takes larger steps)
LEARNING_RATES = {"fine-tune": (1e-4, 3e-4, 1e-3, 3e-3), "probe": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)}


def get_config(arg=None):
    finetune = load_experiment(os.path.join(os.path.dirname(__file__), "bert_finetune.py"))
    config = finetune.get_config(arg)
    with config.unlocked():
        config.num_train_steps = 400  # every arm: 400 steps of 32 sentences
        config.eval_every = 50
        config.checkpoint_every = 400
        config.keep_checkpoints = 1
        config.opt.warmup_steps = 40
        if "smoke" in (arg or ""):
            config.num_train_steps, config.eval_every, config.checkpoint_every = 4, 2, 4
            config.opt.warmup_steps = 1
    return config


def points(steps=PRETRAIN_STEPS, labels=LABELS, seeds=SEEDS, learning_rates=None) -> list:
    """The sweep: every pretraining step x regime x label count x seed x learning rate."""
    learning_rates = learning_rates or LEARNING_RATES
    return [point for regime, frozen in (("fine-tune", False), ("probe", True))
            for point in sweep.product({
                "init_from_step": steps, "model.freeze_encoder": (frozen,),
                "data.max_examples": labels, "seed": seeds, "opt.lr": learning_rates[regime]})]


def get_sweep():
    return points()


def summarize_sweep(rows, workdir):
    """transfer.md / .csv / .png of the arms (`seqjax.analysis.transfer_curve`)."""
    transfer_curve.write(rows, workdir)
    return "transfer.md"
