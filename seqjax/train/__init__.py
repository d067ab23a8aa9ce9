"""The engine: pmapped train step, loop, checkpoints, metrics."""

from seqjax.train.loop import (StopRequest, TrainState, evaluate, generate, train, train_step,
                               translate)

__all__ = ["StopRequest", "TrainState", "evaluate", "generate", "train", "train_step",
           "translate"]
