"""The engine: pmapped train step, loop, checkpoints, metrics."""

from seqjax.train.loop import (StopRequest, TrainState, evaluate, generate, load_init_from,
                               restore_run, train, train_step, translate)

__all__ = ["StopRequest", "TrainState", "evaluate", "generate", "load_init_from", "restore_run",
           "train", "train_step", "translate"]
