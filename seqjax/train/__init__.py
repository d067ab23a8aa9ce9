"""The engine: `train_and_evaluate` (the loop, `loop`), and what can be done with a trained
workdir (`saved_runs`). `train` is the name `train_and_evaluate` had before, kept for callers."""

from seqjax.train.checkpoint import load_init_from
from seqjax.train.loop import train_and_evaluate
from seqjax.train.saved_runs import evaluate, export, generate, restore_run, translate
from seqjax.train.step import TrainState, train_step
from seqjax.train.stopping import StopRequest

train = train_and_evaluate

__all__ = ["StopRequest", "TrainState", "evaluate", "export", "generate", "load_init_from",
           "restore_run", "train", "train_and_evaluate", "train_step", "translate"]
