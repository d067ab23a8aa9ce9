"""Orbax checkpoints of the whole training state, as host (NumPy) pytrees.

`workdir/checkpoints/<step>` holds the latest `keep` states; `workdir/best/<step>` the one with the
best validation loss. Each holds params, optimizer state, step, RNG and stream state (the data
position is the step: batches are a pure function of it), plus a small JSON of run metadata.
"""

import os

import jax
import orbax.checkpoint as ocp


def has_latest(workdir: str) -> bool:
    """Whether `workdir` holds a finished latest checkpoint (orbax names a finished step's
    directory by its number; a step still being written has a temporary name)."""
    path = os.path.join(os.path.abspath(workdir), "checkpoints")
    return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


class Checkpoints:

    def __init__(self, workdir: str, keep: int = 2):
        workdir = os.path.abspath(workdir)
        options = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True)
        self.managers = {
            "latest": ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options(keep)),
            "best": ocp.CheckpointManager(os.path.join(workdir, "best"), options=options(1)),
        }

    def latest_step(self, which: str = "latest"):
        return self.managers[which].latest_step()

    def save(self, step: int, state, meta: dict, which: str = "latest"):
        """Saves `state` and `meta` as `step`, replacing a checkpoint of that step: a run that
        resumes from an earlier step replays the steps after it and may save them again."""
        manager = self.managers[which]
        if jax.process_count() > 1:
            # orbax names its cross-process barrier after the step alone: the best and latest
            # saves of one step must not be in flight together.
            self.wait()
        if step in manager.all_steps():
            manager.delete(step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        manager.save(step, args=args, force=True)

    def meta(self, which: str = "latest") -> dict | None:
        """The metadata of the newest `which` checkpoint, without reading its arrays."""
        manager = self.managers[which]
        step = manager.latest_step()
        if step is None:
            return None
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, template=None, step: int | None = None, which: str = "latest"):
        """Returns (state, meta) of `step` (default: the newest), or None if there is none."""
        manager = self.managers[which]
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        if step not in manager.all_steps():
            raise FileNotFoundError(
                f"no {which} checkpoint at step {step} in {manager.directory}; "
                f"saved steps: {list(manager.all_steps())}")
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def wait(self):
        for manager in self.managers.values():
            manager.wait_until_finished()

    def close(self):
        for manager in self.managers.values():
            manager.close()
