"""The engine: one pure per-device train step, run over the local devices with `jax.pmap` (or
`jax.shard_map`: `config.parallel`), and the loop.

Resume order, decided here and nowhere else: the workdir's own latest checkpoint, else the
parameters of `config.init_from` (another run's workdir: fine-tuning), else scratch.
A workdir's saved config must agree with the new one on what the checkpoint depends on
(`RESUME_KEYS`); a best checkpoint newer than the resumed step is discarded, as the steps after
it are replayed.
"""

import functools
import json
import math
import os
import signal
import time
from typing import Any

import flax
import jax
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from seqjax import config as config_lib
from seqjax import tasks
from seqjax.train import parallel
from seqjax.train.checkpoint import Checkpoints, has_latest
from seqjax.train.metrics import MetricWriter, Progress
from seqjax.train.optimizer import OPTIMIZERS, SCHEDULES, learning_rate_at, make_optimizer

AXIS = parallel.AXIS


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; the key of a step and device is folded from it
    carry: Any  # per-device state carried from batch to batch (see tasks.Task)


# ---------------------------------------------------------------------------------------------
# Pure per-device steps; collectives over the named axis AXIS.
# ---------------------------------------------------------------------------------------------

def train_step(state: TrainState, batch, *, loss_fn, tx):
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(AXIS))

    def loss_sum(params):
        sums, carry = loss_fn(params, batch, state.carry, rng, True)
        return sums["loss"], (sums, carry)

    grads, (sums, carry) = jax.grad(loss_sum, has_aux=True)(state.params)
    # Mean over every token of the global batch, whatever its split across devices.
    weight = lax.pmean(sums["weight"], AXIS)
    grads = jax.tree.map(lambda g: g / weight, lax.pmean(grads, AXIS))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(lax.psum(sums, AXIS), grad_norm=optax.tree_utils.tree_norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, carry=carry)
    return new_state, metrics


def eval_step(params, carry, batch, *, loss_fn):
    sums, carry = loss_fn(params, batch, carry, None, False)
    return lax.psum(sums, AXIS), carry


# ---------------------------------------------------------------------------------------------
# Host <-> devices (`parallel`: pmap or shard_map). Host state: a plain dict of NumPy arrays, as
# saved in checkpoints; `carry` has a leading batch axis, so it is independent of the devices.
# ---------------------------------------------------------------------------------------------

def _state_specs():
    """shard_map's specs of a TrainState: the carry split over the devices, the rest replicated."""
    return TrainState(step=P(), params=P(), opt_state=P(), rng=P(), carry=P(AXIS))


def _local_rows(tree):
    """This process's rows of global-batch arrays (scalars as they are): with P processes,
    process p holds rows [p, p + 1) * B / P, as every task's data source shards them."""
    n, p = jax.process_count(), jax.process_index()
    return jax.tree.map(lambda x: x if np.ndim(x) == 0 else
                        np.asarray(x)[p * (len(x) // n):(p + 1) * (len(x) // n)], tree)


def _global_rows(tree):
    """The rows of every process, in order: the inverse of `_local_rows`."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def _to_devices(host: dict, par) -> TrainState:
    """Host state -> devices; the host carry holds the global batch's rows, so a checkpoint
    does not depend on the number of processes or devices."""
    replicated = par.replicate({k: host[k] for k in ("step", "params", "opt_state", "rng")})
    return TrainState(**replicated, carry=par.batch(_local_rows(host["carry"])))


def _to_host(state: TrainState, par) -> dict:
    """Devices -> host state, the same on every process (a collective with several)."""
    return dict(par.unreplicate(dict(step=state.step, params=state.params,
                                     opt_state=state.opt_state, rng=state.rng)),
                carry=_global_rows(par.unbatch(state.carry)))


# ---------------------------------------------------------------------------------------------
# Validation of the engine's part of the config; tasks validate their own sections.
# ---------------------------------------------------------------------------------------------

def validate(config):
    """Checks the engine's part of a config: steps, devices, optimizer."""
    config_lib.expect_positive_int(config, "num_train_steps", "log_every", "eval_every",
                                   "checkpoint_every", "keep_checkpoints")
    config_lib.expect_type(config, "seed", int)
    config_lib.expect_type(config, "num_devices", int)
    kind = config.get("parallel", "pmap")
    config_lib.expect(kind in parallel.KINDS, "parallel", kind, f"expected one of {parallel.KINDS}")
    opt = config.opt
    config_lib.expect(opt.name in OPTIMIZERS, "opt.name", opt.name, f"expected one of {OPTIMIZERS}")
    config_lib.expect(opt.schedule in SCHEDULES, "opt.schedule", opt.schedule,
                      f"expected one of {SCHEDULES}")
    for key in ("lr", "clip_norm", "weight_decay", "final_lr_fraction", "b1", "b2", "momentum"):
        value = config_lib.expect_type(config, f"opt.{key}", (int, float))
        config_lib.expect(math.isfinite(value) and value >= 0, f"opt.{key}", value,
                          "must be a finite number >= 0")
    config_lib.expect(opt.lr > 0, "opt.lr", opt.lr, "must be > 0")
    config_lib.expect_positive_int(config, "opt.grad_accum_steps")
    value = config_lib.expect_type(config, "opt.warmup_steps", int)
    config_lib.expect(value >= 0, "opt.warmup_steps", value, "must be >= 0")


def _devices(config):
    local = jax.local_devices()
    if jax.process_count() > 1:
        config_lib.expect(config.num_devices == 0, "num_devices", config.num_devices,
                          "with several processes every process uses all its local devices (0)")
    n = config.num_devices or len(local)
    config_lib.expect(0 <= config.num_devices <= len(local), "num_devices", config.num_devices,
                      f"this host has {len(local)} devices (0 uses all)")
    return local[:n]


def _check_divisible(name: str, batch_size: int, devices):
    shards = len(devices) * jax.process_count()
    if batch_size % shards:
        raise ValueError(
            f"{name}={batch_size} does not split evenly over {shards} devices "
            f"({jax.process_count()} processes x {len(devices)} local devices); "
            f"use a multiple of {shards} or set config.num_devices")


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------

class StopRequest:
    """Turns SIGTERM into a flag the loop checks after each step, so it can save and exit.

    Nested requests (a sweep around its runs) share the signal: the inner one starts with the
    outer one's flag and passes a signal on to it."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None
        self.outer = getattr(self.previous, "__self__", None)
        if not isinstance(self.outer, StopRequest):
            self.outer = None
        self.requested = bool(self.outer and self.outer.requested)
        return self

    def _handle(self, *args):
        self.requested = True
        if self.outer is not None:
            self.outer._handle(*args)

    def __exit__(self, *_):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _fetch(pending: list, par) -> list[dict]:
    """Host copies of the metrics of `pending` (step, metrics) pairs; raises on a non-finite loss,
    so a state reached through one is never saved."""
    fetched = []
    for step, m in pending:
        m = {k: float(v) for k, v in par.unreplicate(m).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step + 1}: loss={m['loss']}, "
                f"grad_norm={m['grad_norm']}; stopping without saving this state")
        fetched.append(m)
    return fetched


def _means(sums: dict, denominators: dict) -> dict:
    """Means from sums: each divided by 'weight', or by the sum `denominators` names for it."""
    below = {"weight", *denominators.values()}
    return {k: v / sums[denominators.get(k, "weight")] for k, v in sums.items() if k not in below}


def _train_summary(fetched: list[dict], denominators: dict) -> dict:
    sums = {k: sum(m[k] for m in fetched) for k in fetched[0] if k != "grad_norm"}
    return dict(_means(sums, denominators),
                grad_norm=sum(m["grad_norm"] for m in fetched) / len(fetched))


# What a checkpoint's shapes and meaning depend on: resuming a workdir with any of these changed
# is an error. The rest (steps, schedule, learning rate, dropout, unroll, computation dtype,
# evaluation, logging) may change.
RESUME_KEYS = ("task", "model", "data.preprocess", "data.min_freq", "data.batch_size",
               "data.tokenizer", "data.vocab_size", "data.max_pairs", "data.num_valid",
               "data.num_test", "opt.name", "opt.grad_accum_steps")
RESUME_FREE = ("model.dropout", "model.attention_dropout", "model.unroll", "model.dtype",
               "model.init")


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _resume_signature(config) -> dict:
    flat = config_lib.flatten(config)
    signature = {k: v for k, v in flat.items() if not _under(k, RESUME_FREE)
                 and _under(k, RESUME_KEYS)}
    # Switches that add or remove optimizer state.
    signature["opt.clip_norm > 0"] = bool(flat.get("opt.clip_norm"))
    if flat.get("opt.name") == "sgd":
        signature["opt.momentum > 0"] = bool(flat.get("opt.momentum"))
    return json.loads(json.dumps(signature, default=str))  # as read back from config.json


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def train(config, workdir: str, *, stop_after: int | None = None) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns final metrics.

    `stop_after` ends this call after that many steps, saving as on SIGTERM (a preemption, or a
    job scheduler's time slot). Everything that can be wrong with the config, the data or the
    workdir is checked before anything is written. A finished run is evaluated, not retrained.
    """
    validate(config)
    devices = _devices(config)
    par = parallel.make(config.get("parallel", "pmap"), devices)
    workdir = os.path.abspath(workdir)
    saved = config_lib.load(workdir)
    if saved is not None:
        diff = config_lib.differences(_resume_signature(saved), _resume_signature(config))
        if diff:
            raise ValueError(
                f"{workdir} holds a run with a different model or data; use another workdir, or "
                f"the same config and overrides (see its {config_lib.CONFIG_FILE}). Differences: "
                + "; ".join(diff))
    task = tasks.build(config, workdir)
    _check_divisible("config.data.batch_size", task.batch_size, devices)
    _check_divisible("config.data.eval_batch_size", task.eval_batch_size, devices)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    params = task.init_params(init_rng)
    init_from, loaded = config.get("init_from"), []
    if init_from and not has_latest(workdir):
        params, loaded = load_init_from(params, init_from)

    os.makedirs(workdir, exist_ok=True)
    ckpts = Checkpoints(workdir, config.keep_checkpoints)
    total_steps = config.num_train_steps
    tx = make_optimizer(config.opt, total_steps)
    host = dict(step=np.asarray(0, np.int32), params=jax.device_get(params),
                opt_state=jax.device_get(tx.init(params)), rng=np.asarray(state_rng),
                carry=task.init_carry(task.batch_size))
    try:
        restored = ckpts.restore(template=host)
    except Exception as e:
        ckpts.close()
        raise ValueError(f"the checkpoint in {workdir} does not fit this config: "
                         f"{type(e).__name__}: {e}") from e
    meta = {}
    if restored is not None:
        host, meta = restored
    start = int(host["step"])
    # The best checkpoint may be newer than the latest (saved by a run killed before its next
    # checkpoint); it is a real state with that validation loss, so it stays the one to beat.
    best_meta = ckpts.meta("best") or {}
    best = dict(loss=best_meta.get("best_val_loss"), step=best_meta.get("best_step"))
    state = _to_devices(host, par)
    if jax.process_index() == 0:
        config_lib.save(config, workdir)
        for name, text in task.files.items():
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                f.write(text)

    p_train = par.compile(functools.partial(train_step, loss_fn=task.loss, tx=tx),
                          (_state_specs(), parallel.BATCH), (_state_specs(), P()), donate=True)
    evaluate_params = _evaluator(task, par)
    lr_at = learning_rate_at(config.opt, total_steps)

    writer = MetricWriter(workdir, start)
    progress = Progress(total_steps, start, task.tokens_per_batch)
    if loaded and restored is None:
        progress.write(f"initialised {', '.join(loaded)} from {init_from}")
    if start >= total_steps:
        progress.write(f"{workdir} has finished its {start} steps; evaluating its last checkpoint")
    elif start:
        progress.write(f"resumed from step {start} in {workdir}")
    last_train = meta.get("train", {})  # the last logged training metrics
    results = {"step": start, **_prefixed("train", last_train)}
    pending, fetched = [], []  # device metrics not yet fetched; host metrics not yet logged
    t0, trained_s = time.perf_counter(), meta.get("train_time_s", 0.0)
    meta_now = lambda: dict(best_val_loss=best["loss"], best_step=best["step"],
                            train_time_s=trained_s + time.perf_counter() - t0, train=last_train)
    try:
        with StopRequest() as stop:
            for step in range(start, total_steps):
                state, metrics = p_train(state, par.batch(task.train_batch(step)))
                pending.append((step, metrics))
                done = step + 1
                preempted = stop.requested or (stop_after is not None and done - start >= stop_after)
                last = done == total_steps or preempted
                do_eval = done % config.eval_every == 0 or done == total_steps
                do_save = done % config.checkpoint_every == 0 or last
                do_log = done % config.log_every == 0 or last
                if not (do_log or do_eval or do_save):
                    continue
                fetched += _fetch(pending, par)
                pending = []
                if do_log:
                    last_train = dict(task.report(_train_summary(fetched, task.denominators)), lr=lr_at(step))
                    fetched = []
                    writer.write(done, "train", last_train)
                    progress.update(done, **{k: v for k, v in last_train.items() if k != "grad_norm"})
                    results.update(_prefixed("train", last_train))
                host_state = None  # fetched once for both saves of a step
                if do_eval:
                    val = _validate(task, evaluate_params, state.params, par,
                                    final=done == total_steps)
                    writer.write(done, "val", val)
                    results.update(_prefixed("val", val))
                    if best["loss"] is None or val["loss"] < best["loss"]:
                        best = dict(loss=val["loss"], step=done)
                        host_state = _to_host(state, par)
                        ckpts.save(done, host_state, meta_now(), which="best")
                    progress.write(f"step {done}: " + ", ".join(f"val {k} {v:.4f}" for k, v in val.items()))
                if do_save:
                    if host_state is None:
                        host_state = _to_host(state, par)
                    ckpts.save(done, host_state, meta_now())
                results["step"] = done
                if preempted and not done == total_steps:
                    progress.write(f"stopped early: saved step {done} to {workdir}/checkpoints")
                    results["stopped"] = True
                    break
    finally:
        progress.close()
        writer.close()
        ckpts.wait()
        ckpts.close()
    # Time in the training loop (evaluation included) of the runs that led to this state.
    results["train_time_s"] = meta_now()["train_time_s"]
    if start >= total_steps:  # nothing left to train: report the final checkpoint
        results.update(_prefixed("val", _validate(task, evaluate_params, state.params, par,
                                                  final=True)))
    if best["loss"] is not None:
        results.update(_prefixed("best_val", task.report({"loss": best["loss"]})),
                       best_step=best["step"])
    if task.generate is not None and not results.get("stopped") and config.get("sample"):
        results["sample"] = task.generate(par.unreplicate(state.params), jax.random.PRNGKey(config.seed),
                                          **config.sample)
    return results


def _validate(task, evaluate_params, params, par, *, final: bool) -> dict:
    """Validation metrics of replicated `params`: the task's loss metrics, and those of its
    `decode_eval` (a search on the host: BLEU; with `final`, also its test metrics)."""
    metrics = task.report(evaluate_params(params))
    if task.decode_eval is not None:
        metrics.update(task.decode_eval(par.unreplicate(params), final))
    return metrics


def _evaluator(task, par):
    """A function params (replicated on the devices) -> mean metrics over the task's eval batches."""
    p_eval = par.compile(functools.partial(eval_step, loss_fn=task.loss),
                         (P(), P(AXIS), parallel.BATCH), (P(), P(AXIS)))

    def evaluate_params(params):
        carry = par.batch(task.init_carry(task.eval_batch_size // jax.process_count()))
        total = {}
        for batch in task.eval_batches():
            sums, carry = p_eval(params, carry, par.batch(_local_rows(batch)))
            # Read back before the next batch is dispatched, and summed on the host (an
            # operation on the global `sums` would be one more program that every process has
            # to run in step). With every batch's program dispatched before reading any back,
            # XLA:CPU's collectives deadlocked now and then: 3 of 4 devices waiting in the psum
            # for the 4th (seen in 2 of 4 test-suite runs, always in evaluation).
            for k, v in par.unreplicate(sums).items():
                total[k] = total.get(k, 0.0) + float(v)
        return _means(total, task.denominators)

    return evaluate_params


# ---------------------------------------------------------------------------------------------
# Evaluation and generation from a saved run.
# ---------------------------------------------------------------------------------------------

def restore_run(workdir: str, step: int | None = None, which: str = "latest", defaults=None):
    """(saved config, task, params on the host, step) of a trained workdir; `defaults` (the
    experiment's config) gives the fields that the saved config lacks."""
    workdir = os.path.abspath(workdir)
    config, state = _restore_params(workdir, step, which, defaults)
    task = tasks.build(config, workdir)
    check_params(state["params"], jax.eval_shape(task.init_params, jax.random.PRNGKey(0)),
                 f"the checkpoint in {workdir}")
    return config, task, state["params"], int(state["step"])


def load_init_from(params, source: str):
    """`params` with every top-level module that the latest checkpoint of the run in `source`
    also has (a pretrained encoder) replaced by that run's arrays, which must have the same
    shapes; the other modules (a new head) keep their fresh values. Only parameters are read:
    not the optimizer state, step or RNG. Returns (params, names of the loaded modules)."""
    saved = _restore_params(source)[1]["params"]["params"]
    fresh = params["params"]
    loaded = sorted(fresh.keys() & saved.keys())
    if not loaded:
        raise ValueError(f"config.init_from={source!r}: its modules {sorted(saved)} have none "
                         f"in common with this model's {sorted(fresh)}")
    check_params({k: saved[k] for k in loaded}, {k: fresh[k] for k in loaded},
                 f"the checkpoint in config.init_from={source!r}")
    merged = {k: saved[k] if k in loaded else v for k, v in fresh.items()}
    return {**params, "params": jax.tree.map(np.asarray, merged)}, loaded


def _restore_params(workdir: str, step: int | None = None, which: str = "latest", defaults=None):
    """(saved config completed from `defaults`, the saved state on the host) of the checkpoint
    of a trained workdir."""
    workdir = os.path.abspath(workdir)
    config = config_lib.load(workdir)
    if config is None:
        raise FileNotFoundError(f"{workdir} has no {config_lib.CONFIG_FILE}: nothing was trained there")
    config = config_lib.with_defaults(config, defaults)
    ckpts = Checkpoints(workdir, config.keep_checkpoints)
    try:
        restored = ckpts.restore(step=step, which=which)
    finally:
        ckpts.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir} has no {which} checkpoint")
    return config, restored[0]


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


def evaluate(config, workdir: str, step: int | None = None, which: str = "latest") -> dict:
    """Validation metrics of a saved checkpoint; the model and data come from the saved config
    (fields it lacks from `config`, which may be None)."""
    saved, task, params, step = restore_run(workdir, step, which, defaults=config)
    devices = _devices(saved)
    _check_divisible("config.data.eval_batch_size", task.eval_batch_size, devices)
    par = parallel.make(saved.get("parallel", "pmap"), devices)
    return {"step": step, **_validate(task, _evaluator(task, par), par.replicate(params), par,
                                      final=True)}


def generate(workdir: str, *, step: int | None = None, which: str = "latest", seed: int = 0,
             defaults=None, **options) -> str:
    """Samples from a saved checkpoint with the task's generator (`options` as in config.sample)."""
    saved, task, params, _ = restore_run(workdir, step, which, defaults)
    if task.generate is None:
        raise ValueError(f"task {saved.task!r} does not generate text")
    return task.generate(params, jax.random.PRNGKey(seed), **{**saved.sample.to_dict(), **options})


def translate(workdir: str, sentences: list[str], *, step: int | None = None,
              which: str = "latest", defaults=None, **options) -> list[str]:
    """Translations of `sentences` by a saved checkpoint (`options`: beam_size, length_penalty)."""
    saved, task, params, _ = restore_run(workdir, step, which, defaults)
    if task.translate is None:
        raise ValueError(f"task {saved.task!r} does not translate")
    return task.translate(params, sentences, **options)


def export(workdir: str, out: str, *, step: int | None = None, which: str = "latest") -> dict:
    """Writes the parameters of a checkpoint to `out` (.npz): one array per parameter, keyed by
    its path in the parameter tree ('encoder/blocks_0/attention/W_q/kernel', 'rnn/cell/W_xh'),
    readable with plain `numpy.load`. Returns {name: shape}."""
    _, state = _restore_params(workdir, step, which)
    flat = flax.traverse_util.flatten_dict(state["params"]["params"], sep="/")
    arrays = {name: np.asarray(x) for name, x in flat.items()}
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(out)}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    return {name: x.shape for name, x in arrays.items()}
