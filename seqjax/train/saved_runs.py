"""What can be done with a trained workdir: restore it, evaluate, sample or translate with one of
its checkpoints, or export its parameters. The model and data come from the run's saved config;
`defaults` (the experiment's current config) gives the fields it lacks."""

import io
import os

import flax
import jax
import numpy as np

from seqjax import files, tasks
from seqjax.train import parallel
from seqjax.train.checkpoint import check_params, restore_saved
from seqjax.train.evaluation import make_evaluator


def restore_run(workdir: str, step: int | None = None, which: str = "latest", defaults=None):
    """(saved config, task, params on the host, step) of a checkpoint of a trained workdir."""
    workdir = files.absolute(workdir)
    config, state = restore_saved(workdir, step, which, defaults)
    task = tasks.build(config, workdir)
    check_params(state["params"], jax.eval_shape(task.init_params, jax.random.PRNGKey(0)),
                 f"the checkpoint in {workdir}")
    return config, task, state["params"], int(state["step"])


def evaluate(config, workdir: str, step: int | None = None, which: str = "latest") -> dict:
    """Validation (and the task's test) metrics of a saved checkpoint; `config` (or None) gives
    the fields the saved config lacks."""
    saved, task, params, step = restore_run(workdir, step, which, defaults=config)
    devices = parallel.local_devices(saved)
    parallel.check_divisible("config.data.eval_batch_size", task.eval_batch_size, devices)
    par = parallel.make(saved.get("parallel", "pmap"), devices)
    return {"step": step, **make_evaluator(task, par)(par.replicate(params), final=True)}


def generate(workdir: str, *, step: int | None = None, which: str = "latest", seed: int = 0,
             defaults=None, **options) -> str:
    """Samples from a saved checkpoint with the task's generator (`options` as in config.sample)."""
    saved, task, params, _ = restore_run(workdir, step, which, defaults)
    if task.generate is None:
        raise ValueError(f"task {saved.task!r} does not generate text")
    return task.generate(params, jax.random.PRNGKey(seed), **{**saved.sample.to_dict(), **options})


def translate(workdir: str, sentences: list[str], *, step: int | None = None,
              which: str = "latest", defaults=None, **options) -> list[str]:
    """Translations of `sentences` by a saved checkpoint (`options`: beam_size, length_penalty,
    on_error: see the task's `translate_sentences`)."""
    saved, task, params, _ = restore_run(workdir, step, which, defaults)
    if task.translate_sentences is None:
        raise ValueError(f"task {saved.task!r} does not translate")
    return task.translate_sentences(params, sentences, **options)


def export(workdir: str, out: str, *, step: int | None = None, which: str = "latest") -> dict:
    """Writes the parameters of a checkpoint to `out` (.npz, a local path or a URL; by process 0):
    one array per parameter, keyed by its path in the parameter tree
    ('encoder/blocks_0/attention/W_q/kernel', 'rnn/cell/W_xh'), readable with plain
    `numpy.load`. Returns {name: shape}."""
    _, state = restore_saved(workdir, step, which)
    flat = flax.traverse_util.flatten_dict(state["params"]["params"], sep="/")
    arrays = {name: np.asarray(x) for name, x in flat.items()}
    archive = io.BytesIO()
    np.savez(archive, **arrays)
    files.makedirs(os.path.dirname(files.absolute(out)))
    files.write_from_process_0(out, archive.getvalue())
    return {name: x.shape for name, x in arrays.items()}
