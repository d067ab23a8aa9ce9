"""Orbax checkpoints of the whole training state, and reading them back as host (NumPy) pytrees:
the state of a saved run, and the parameters that `config.init_from` starts a new run from.
A training run saves the arrays on its devices (`parallel.to_saved`); orbax copies them to the
host and writes them in the background.

`workdir/checkpoints/<step>` holds the latest `keep` states; `workdir/best/<step>` the one with the
best validation loss. Each holds params, optimizer state, step, RNG and stream state (the data
position is the step: batches are a pure function of it), plus a small JSON of run metadata.
The workdir may be a bucket (gs://bucket/run): orbax writes the arrays there with tensorstore's
GCS driver and its small files through epath, as `seqjax.files` does the rest.
"""

import logging
import os
import sys
import threading

import etils.epath as epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from seqjax import config as config_lib
from seqjax import files
from seqjax.train.checks import check_workdir

DAMAGED_DIR = "damaged"  # where a training run sets aside the checkpoints it cannot read


class CheckpointError(OSError):
    """A checkpoint could not be written: the run stops, keeping the checkpoints written before."""


class DamagedCheckpoint(ValueError):
    """A checkpoint that cannot be read back (cut short, corrupted, or an empty directory)."""


def has_latest(workdir: str) -> bool:
    """Whether `workdir` holds a finished latest checkpoint (orbax names a finished step's
    directory by its number; a step still being written has a temporary name)."""
    path = os.path.join(files.absolute(workdir), "checkpoints")
    return files.is_dir(path) and any(name.isdigit() for name in files.listdir(path))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}"


def _leaf_shapes(tree) -> dict:
    """{'opt_state/1/0/mu/params/head/kernel': shape} of a state or of orbax's metadata of one:
    tuples and lists, dicts and named tuples give the same names."""
    def name(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)
    return {"/".join(map(name, path)): tuple(getattr(x, "shape", np.shape(x)))
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


_damaged_paths: set = set()  # checkpoints whose failed reads are left to finish quietly


def _quiet_closed_loop_errors(path: str):
    """Reading a damaged checkpoint, orbax's other reads of it end on an event loop it has
    closed: the storage library's callbacks raise 'Event loop is closed' (caught by Python's
    hooks) and asyncio logs '... exception was never retrieved' for each, dozens of tracebacks
    after the one DamagedCheckpoint that says it all. These filters drop those: the loop
    errors, and the never-retrieved errors that name a damaged checkpoint's files."""
    first = not _damaged_paths
    _damaged_paths.add(path)
    if not first:
        return
    closed_loop = lambda e: isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
    thread_hook = threading.excepthook
    sys.excepthook = lambda kind, value, tb: None if closed_loop(value) else excepthook(
        kind, value, tb)
    sys.unraisablehook = lambda u: None if closed_loop(u.exc_value) else unraisablehook(u)
    threading.excepthook = lambda a: None if closed_loop(a.exc_value) else thread_hook(a)

    def keep(record):
        text = f"{record.getMessage()} {record.exc_info[1] if record.exc_info else ''}"
        return not ("never retrieved" in text and any(p in text for p in _damaged_paths))

    logging.getLogger("asyncio").addFilter(keep)


def _state_handler():
    """orbax's PyTree handler (which StandardSave wraps: the same files) with its standard
    type handlers, except that a replicated jax.Array is written whole by one replica, as a
    host array is, rather than cut into one slice per replica (orbax's default unless
    JAX_PLATFORMS names a GPU). Slices make the files depend on the device count, and small
    slices are inlined into the index when orbax merges it, leaving the data files they were
    first written to on disk, unread (a tiny run's checkpoint tripled in size)."""
    handlers = [(t, ocp.type_handlers.get_type_handler(t))
                for t in ocp.type_handlers.supported_types() if t is not jax.Array]
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)), *handlers)
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpoints:
    """A workdir's checkpoints: the `keep` latest (and the steps of `keep_steps` besides, for
    what is loaded from them later: `init_from_step`) in `checkpoints/`, the best in `best/`."""

    def __init__(self, workdir: str, keep: int = 2, keep_steps=()):
        self.workdir = files.absolute(workdir)
        latest = ocp.checkpoint_managers.LatestN(keep)
        kept = {"checkpoints": ocp.checkpoint_managers.AnyPreservationPolicy(
                    [latest, ocp.checkpoint_managers.CustomSteps(list(keep_steps))])
                if keep_steps else latest, "best": ocp.checkpoint_managers.LatestN(1)}
        manager = lambda name: ocp.CheckpointManager(
            os.path.join(self.workdir, name),
            options=ocp.CheckpointManagerOptions(preservation_policy=kept[name], create=True),
            item_handlers={"state": _state_handler(), "meta": ocp.JsonCheckpointHandler()})
        self.managers = {"latest": manager("checkpoints"), "best": manager("best")}

    def latest_step(self, which: str = "latest"):
        return self.managers[which].latest_step()

    def save(self, step: int, state, meta: dict, which: str = "latest"):
        """Saves `state` (host arrays, or global jax.Arrays on the devices) and `meta` as
        `step`, replacing a checkpoint of that step: a run that resumes from an earlier step
        replays the steps after it and may save them again. A failed write (of this save or of
        an earlier one still in flight) is a CheckpointError.

        Device arrays may be donated to the next step as soon as this returns: orbax 0.12's
        save() copies every array to host memory before it returns (its blocking phase:
        AsyncCheckpointer.save awaits ArrayHandler.serialize, whose
        replica_slices.transfer_arrays_to_host starts every copy and waits for them all, as it
        does when the handler has no `save_device_host_concurrent_gb` limit, and ours has
        none); only the writing of files runs in its background thread. Were a later orbax to
        read them afterwards, a donated array would read as deleted: the save would fail with
        an error, never write another step's values (tests/test_host_path.py checks that a
        save has its copies when it returns)."""
        manager = self.managers[which]
        try:
            if jax.process_count() > 1:
                # orbax names its cross-process barrier after the step alone: the best and
                # latest saves of one step must not be in flight together.
                self.wait()
            if step in manager.all_steps():
                manager.delete(step)
            args = ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                      meta=ocp.args.JsonSave(meta))
            manager.save(step, args=args, force=True)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"a checkpoint write in {manager.directory} failed (seen "
                                  f"when saving step {step}): {_one_line(e)}") from e

    def meta(self, which: str = "latest") -> dict | None:
        """The metadata of the newest readable `which` checkpoint, without reading its arrays."""
        manager = self.managers[which]
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
            except Exception:  # damaged: restore() reports it when the state is read
                continue
        return None

    def restore(self, template=None, step: int | None = None, which: str = "latest",
                on_damaged=None):
        """(state, meta) of `step`, or by default of the newest checkpoint that reads back:
        each damaged one skipped is passed to `on_damaged(step, DamagedCheckpoint)`. Returns
        None if there is none. With a `template` (the state this config makes), a checkpoint
        whose arrays have other names or shapes is a ValueError, not damage: the config
        differs from the run's."""
        manager = self.managers[which]
        if step is not None:
            if step not in manager.all_steps():
                raise FileNotFoundError(
                    f"no {which} checkpoint at step {step} in {manager.directory}; "
                    f"saved steps: {list(manager.all_steps())}")
            return self._restore_step(manager, step, template)
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return self._restore_step(manager, step, template)
            except DamagedCheckpoint as e:
                if on_damaged is None:
                    raise
                on_damaged(step, e)
        return None

    def _restore_step(self, manager, step: int, template):
        """(state, meta) of `step`, the state as host arrays: read into `template`, or without
        one into arrays of the saved shapes (not onto the devices that saved them, which this
        process may not have)."""
        path = epath.Path(manager.directory) / str(step)
        try:
            stored = ocp.StandardCheckpointHandler().metadata(path / "state")
        except Exception as e:
            raise DamagedCheckpoint(f"{path / 'state'}: its metadata cannot be read "
                                    f"({_one_line(e)})") from e
        if template is not None:
            _check_shapes(_leaf_shapes(stored.tree), _leaf_shapes(template),
                          f"the checkpoint {path}")
        else:
            template = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), stored.tree)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(template, ocp.checkpoint_utils.construct_restore_args(
                    template)), meta=ocp.args.JsonRestore()))
        except (ValueError, OSError, KeyError) as e:  # a file cut short, corrupted or missing
            _quiet_closed_loop_errors(str(path))
            raise DamagedCheckpoint(f"{path}: {_one_line(e)}") from e
        return restored["state"], restored["meta"]

    def set_aside(self, step: int, which: str = "latest") -> str:
        """Moves a damaged checkpoint out of the way of new saves into `workdir/damaged/`
        (kept, not deleted: a person may want it); returns where it went."""
        manager = self.managers[which]
        name = f"{os.path.basename(manager.directory)}-{step}"
        target = os.path.join(self.workdir, DAMAGED_DIR, name)
        while files.exists(target):  # the same step damaged again after a replay
            target += "+"
        files.makedirs(os.path.dirname(target))
        files.move(os.path.join(manager.directory, str(step)), target)
        manager.reload()
        return target

    def wait(self):
        try:
            for manager in self.managers.values():
                manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"a checkpoint save failed: {_one_line(e)}") from e

    def close(self):
        for manager in self.managers.values():
            manager.close()


def restore_saved(workdir: str, step: int | None = None, which: str = "latest", defaults=None):
    """(saved config completed from `defaults`, the saved host state) of a trained workdir's
    checkpoint (`step`, default the newest `which`)."""
    workdir = check_workdir(workdir)
    config = config_lib.load(workdir)
    if config is None:
        raise FileNotFoundError(f"{workdir} has no {config_lib.CONFIG_FILE}: nothing was "
                                f"trained there")
    config = config_lib.with_defaults(config, defaults)
    ckpts = Checkpoints(workdir, config.keep_checkpoints)
    skipped = lambda step, error: print(f"warning: skipped damaged checkpoint {error}",
                                        file=sys.stderr)
    try:
        restored = ckpts.restore(step=step, which=which, on_damaged=skipped)
    finally:
        ckpts.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir} has no {which} checkpoint")
    return config, restored[0]


def load_init_from(params, source: str, step: int | None = None):
    """`params` with every top-level module that the checkpoint of the run in `source` (of
    `step`, default the latest) also has (a pretrained encoder) replaced by that run's arrays,
    which must have the same shapes; the other modules (a new head) keep their fresh values.
    Only parameters are read: not the optimizer state, step or RNG. Returns (params, names of
    the loaded modules)."""
    saved = restore_saved(source, step)[1]["params"]["params"]
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
    shapes = lambda tree: {jax.tree_util.keystr(path): tuple(np.shape(x))
                           for path, x in jax.tree_util.tree_leaves_with_path(tree)}
    _check_shapes(shapes(params), shapes(expected), what)


def _check_shapes(have: dict, want: dict, what: str):
    """Raises a ValueError naming the first array whose shape in `have` differs from `want`."""
    for name in sorted(have.keys() | want.keys()):
        if have.get(name) != want.get(name):
            raise ValueError(f"{what} does not fit this model: parameter {name} has shape "
                             f"{have.get(name, 'missing')} where the model needs "
                             f"{want.get(name, 'none')} (a different vocabulary or model size?)")
