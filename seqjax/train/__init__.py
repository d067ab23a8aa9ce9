"""The engine: the per-device train step (pmap or shard_map), loop, checkpoints, metrics."""

from seqjax.train.loop import (StopRequest, TrainState, evaluate, export, generate,
                               load_init_from, restore_run, train, train_step, translate)

__all__ = ["StopRequest", "TrainState", "evaluate", "export", "generate", "load_init_from",
           "restore_run", "train", "train_step", "translate"]
