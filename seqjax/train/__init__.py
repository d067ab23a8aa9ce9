"""The engine: pmapped train step, loop, checkpoints, metrics."""

from seqjax.train.loop import TrainState, evaluate, generate, train, train_step

__all__ = ["TrainState", "evaluate", "generate", "train", "train_step"]
