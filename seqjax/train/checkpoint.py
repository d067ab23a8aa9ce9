"""Orbax checkpoints of the whole training state, as host (NumPy) pytrees, and reading them back:
the state of a saved run, and the parameters that `config.init_from` starts a new run from.

`workdir/checkpoints/<step>` holds the latest `keep` states; `workdir/best/<step>` the one with the
best validation loss. Each holds params, optimizer state, step, RNG and stream state (the data
position is the step: batches are a pure function of it), plus a small JSON of run metadata.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from seqjax import config as config_lib


def has_latest(workdir: str) -> bool:
    """Whether `workdir` holds a finished latest checkpoint (orbax names a finished step's
    directory by its number; a step still being written has a temporary name)."""
    path = os.path.join(os.path.abspath(workdir), "checkpoints")
    return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


class Checkpoints:

    def __init__(self, workdir: str, keep: int = 2):
        workdir = os.path.abspath(workdir)
        manager = lambda name, keep: ocp.CheckpointManager(
            os.path.join(workdir, name),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
        self.managers = {"latest": manager("checkpoints", keep), "best": manager("best", 1)}

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


def restore_saved(workdir: str, step: int | None = None, which: str = "latest", defaults=None):
    """(saved config completed from `defaults`, the saved host state) of a trained workdir's
    checkpoint (`step`, default the newest `which`)."""
    workdir = os.path.abspath(workdir)
    config = config_lib.load(workdir)
    if config is None:
        raise FileNotFoundError(f"{workdir} has no {config_lib.CONFIG_FILE}: nothing was "
                                f"trained there")
    config = config_lib.with_defaults(config, defaults)
    ckpts = Checkpoints(workdir, config.keep_checkpoints)
    try:
        restored = ckpts.restore(step=step, which=which)
    finally:
        ckpts.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir} has no {which} checkpoint")
    return config, restored[0]


def load_init_from(params, source: str):
    """`params` with every top-level module that the latest checkpoint of the run in `source`
    also has (a pretrained encoder) replaced by that run's arrays, which must have the same
    shapes; the other modules (a new head) keep their fresh values. Only parameters are read:
    not the optimizer state, step or RNG. Returns (params, names of the loaded modules)."""
    saved = restore_saved(source)[1]["params"]["params"]
    fresh = params["params"]
    loaded = sorted(fresh.keys() & saved.keys())
    if not loaded:
        raise ValueError(f"config.init_from={source!r}: its modules {sorted(saved)} have none "
                         f"in common with this model's {sorted(fresh)}")
    check_params({k: saved[k] for k in loaded}, {k: fresh[k] for k in loaded},
                 f"the checkpoint in config.init_from={source!r}")
    merged = {k: saved[k] if k in loaded else v for k, v in fresh.items()}
    return {**params, "params": jax.tree.map(np.asarray, merged)}, loaded


def check_params(params, expected, what: str):
    """Raises a ValueError naming the first parameter of `params` whose shape differs from
    `expected` (arrays or shape structs), or that one of them lacks."""
    have = {jax.tree_util.keystr(path): np.shape(x)
            for path, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(path): tuple(x.shape)
            for path, x in jax.tree_util.tree_leaves_with_path(expected)}
    for name in sorted(have.keys() | want.keys()):
        if have.get(name) != want.get(name):
            raise ValueError(f"{what} does not fit this model: parameter {name} has shape "
                             f"{have.get(name, 'missing')} where the model needs "
                             f"{want.get(name, 'none')} (a different vocabulary or model size?)")
