"""The training loop: `train_and_evaluate(config, workdir)` trains a task's model with the pure
per-device `train_step`, logging, evaluating and saving as the config asks.

Where a run starts, decided here and nowhere else: the workdir's own latest checkpoint, else
the parameters of `config.init_from` (another run's workdir: fine-tuning), else scratch. A
workdir's saved config must agree with the new one on what the checkpoint depends on
(`checks.RESUME_KEYS`). A best checkpoint newer than the resumed step stays the one to beat: it
is a real state with that validation loss (saved by a run killed before its next checkpoint).
A run may end before its last step (`seqjax.train.stopping`): a SIGTERM on any of its processes
stops all of them after the same step, saved, to be resumed; early stopping ends it, finished.
"""

import dataclasses
import functools
import math
import os
import tempfile
import time

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from seqjax import config as config_lib
from seqjax import files, profiling, tasks
from seqjax.train import checks, parallel, stopping
from seqjax.train.checkpoint import CheckpointError, Checkpoints, has_latest, load_init_from
from seqjax.train.evaluation import make_evaluator
from seqjax.train.feed import Feed
from seqjax.train.lock import WorkdirLock
from seqjax.train.metrics import MetricWriter, Progress, prefixed, train_summary
from seqjax.train.optimizer import learning_rate_at, make_optimizer
from seqjax.train.step import state_specs, train_step
from seqjax.train.stopping import EarlyStopping, StopRequest

PROFILE_DIR = "profile"  # workdir/profile: the trace of --profile_steps, for TensorBoard


@dataclasses.dataclass
class RunRecord:
    """A run's bookkeeping beside its state, saved as each checkpoint's metadata: the best
    validation loss and its step, the training time of the calls before this one, and the last
    logged training metrics."""

    best_loss: float | None = None
    best_step: int | None = None
    earlier_time_s: float = 0.0
    last_train: dict = dataclasses.field(default_factory=dict)
    last_val: dict = dataclasses.field(default_factory=dict)
    evaluations_since_best: int = 0
    data_state: dict | None = None  # a streamed corpus' position after the step (Feed.state)
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @classmethod
    def from_meta(cls, latest: dict, best: dict) -> "RunRecord":
        return cls(best_loss=best.get("best_val_loss"), best_step=best.get("best_step"),
                   earlier_time_s=latest.get("train_time_s", 0.0),
                   last_train=latest.get("train", {}), last_val=latest.get("val", {}),
                   evaluations_since_best=latest.get("evaluations_since_best", 0),
                   data_state=latest.get("data"))

    def train_time_s(self) -> float:
        """Time in the training loop (evaluation included) of the calls that led here."""
        return self.earlier_time_s + time.perf_counter() - self.started

    def improves(self, loss: float) -> bool:
        return self.best_loss is None or loss < self.best_loss

    def meta(self) -> dict:
        return dict(best_val_loss=self.best_loss, best_step=self.best_step,
                    train_time_s=self.train_time_s(), train=self.last_train, val=self.last_val,
                    evaluations_since_best=self.evaluations_since_best, data=self.data_state)


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


def fresh_params(config, task):
    return task.init_params(jax.random.split(jax.random.PRNGKey(config.seed))[0])


def initial_state(config, task, tx, params) -> dict:
    """The host state of step 0 with `params`."""
    state_rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]
    return dict(step=np.asarray(0, np.int32), params=jax.device_get(params),
                opt_state=jax.device_get(tx.init(params)), rng=np.asarray(state_rng),
                carry=task.init_carry(task.batch_size))


def _fresh_state(config, workdir, task, tx):
    """(host state of step 0, names of the modules loaded from config.init_from): the
    parameters of `config.init_from` (of its checkpoint at `config.init_from_step`, default the
    latest; step 0: none, the run starts untrained with init_from's vocabulary) when the
    workdir has no checkpoint of its own, else fresh."""
    params, loaded = fresh_params(config, task), []
    step = config.get("init_from_step")
    if config.get("init_from") and not has_latest(workdir) and step != 0:
        config_lib.expect_run_dir(config, "init_from")
        params, loaded = load_init_from(params, config.init_from, step)
    return initial_state(config, task, tx, params), loaded


def _restore(ckpts, template):
    """(host state, metadata) of the newest checkpoint of the workdir that reads back, or None
    if it has none. Damaged ones are set aside (by process 0), so that the steps replayed after
    the restored one can be saved again; if every one is damaged, the run is refused rather
    than started from scratch beside them."""
    damaged = []
    try:
        restored = ckpts.restore(template=template,
                                 on_damaged=lambda step, e: damaged.append((step, e)))
        if damaged and restored is None:
            raise ValueError(f"every checkpoint in {ckpts.workdir}/checkpoints is damaged; "
                             f"the newest: {damaged[0][1]}")
        if jax.process_index() == 0:
            for step, error in damaged:
                where = ckpts.set_aside(step)
                print(f"skipped damaged checkpoint {error}; moved it to {where}", flush=True)
    except Exception:
        ckpts.close()
        raise
    if jax.process_count() > 1:  # the others see the checkpoints process 0 has moved
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("seqjax: damaged checkpoints set aside")
        for manager in ckpts.managers.values():
            manager.reload()
    return restored


def _close(progress, writer, ckpts, *, failed: bool):
    """Closes the run's outputs. After a success it waits for the saves in flight and raises
    their errors; after a failure, the error in flight is the one to report."""
    progress.close()
    writer.close()
    if failed:
        try:
            ckpts.close()
        except Exception:
            pass
        return
    try:
        ckpts.wait()
    finally:
        ckpts.close()


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None,
                       profile_steps: tuple[int, int] | None = None) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns final metrics.

    `stop_after` ends this call after that many steps, saving as on SIGTERM (a preemption, or a
    job scheduler's time slot). `profile_steps=(A, B)` writes a `jax.profiler` trace of steps
    A to B (counted from 1) into `workdir/profile` (`tensorboard --logdir workdir/profile`);
    only process 0 traces, as only it writes the workdir's other files: every process runs the
    same step, and several processes on one host would write the same `<host>.xplane.pb`.
    Everything that can be wrong with the config, the data or the workdir is checked before
    anything is written. A finished run is evaluated, not retrained.
    """
    # --- check everything, then build -------------------------------------------------------
    checks.check_config(config)
    stopping.check_config(config)
    if profile_steps is not None:
        first, last = profiling.check_steps(profile_steps)
        if last > config.num_train_steps:
            raise ValueError(f"profile_steps={first},{last}: the run has only "
                             f"{config.num_train_steps} steps (config.num_train_steps)")
    workdir = checks.check_workdir(workdir)
    devices = parallel.local_devices(config)
    par = parallel.make(config.get("parallel", "pmap"), devices)
    saved = config_lib.load(workdir)
    if saved is not None:
        checks.check_resumable(saved, config, workdir)
    task = _with_process_zero_files(config, tasks.build(config, workdir))
    parallel.check_divisible("config.data.batch_size", task.batch_size, devices)
    parallel.check_divisible("config.data.eval_batch_size", task.eval_batch_size, devices)
    tx = make_optimizer(config.opt, config.num_train_steps, task.frozen)
    host, loaded = _fresh_state(config, workdir, task, tx)
    files.makedirs(workdir)
    with WorkdirLock(workdir):
        return _run(config, workdir, task, par, tx, host, loaded, stop_after, profile_steps)


def _with_process_zero_files(config, task):
    """`task`, or on a process whose vocabularies or tokenizers differ from process 0's, the
    task rebuilt with process 0's: a fresh run trains them on every process, and the
    `tokenizers` library's trainer breaks ties between equal counts in hash-map order, so two
    processes can train different tokenizers from the same text. Only process 0 writes them."""
    if jax.process_count() == 1:
        return task
    shared = parallel.process_zero_texts(task.files)
    if shared == task.files:
        return task
    with tempfile.TemporaryDirectory() as own_files:
        for name, text in shared.items():
            files.write_text(os.path.join(own_files, name), text)
        return tasks.build(config, own_files)


def _run(config, workdir, task, par, tx, host, loaded, stop_after, profile_steps) -> dict:
    """The run itself, on a locked workdir, from the fresh state `host` (with the modules named
    in `loaded` from config.init_from) unless the workdir has a checkpoint."""
    # --- the starting state: the workdir's checkpoint, else init_from, else scratch ----------
    keep_steps = tuple(config.get("keep_steps", ()))
    ckpts = Checkpoints(workdir, config.keep_checkpoints, keep_steps)
    restored = _restore(ckpts, host)
    meta = {}
    if restored is not None:
        (host, meta), loaded = restored, []
    if task.featurize is not None:
        task = task.featurize(task, host["params"])
    start, total_steps = int(host["step"]), config.num_train_steps
    state = parallel.to_devices(host, par)
    record = RunRecord.from_meta(meta, ckpts.meta("best") or {})
    results = {"step": start, **prefixed("train", record.last_train)}
    validation_metrics = make_evaluator(task, par)
    writer = MetricWriter(workdir, start)
    progress = Progress(total_steps, start, task.tokens_per_batch)
    if loaded:
        progress.write(f"initialised {', '.join(loaded)} from {config.init_from}")

    # --- the three actions ------------------------------------------------------------------
    lr_at = learning_rate_at(config.opt, total_steps)

    def log(done, fetched):
        record.last_train = dict(task.report(train_summary(fetched, task.denominators)),
                                 lr=lr_at(done - 1))
        writer.write(done, "train", record.last_train)
        progress.update(done, **{k: v for k, v in record.last_train.items() if k != "grad_norm"})
        results.update(prefixed("train", record.last_train))

    files_saved = False  # the run's config and files are written with its first checkpoint

    def save_files():
        nonlocal files_saved
        if not files_saved and jax.process_index() == 0:
            try:
                config_lib.save(config, workdir)
                for name, text in task.files.items():
                    files.write_text(os.path.join(workdir, name), text)
            except OSError as e:
                raise CheckpointError(f"writing the run's files to {workdir} failed: {e}") from e
        files_saved = True

    def checkpoint(done, saved, which="latest"):
        save_files()
        writer.flush()
        ckpts.save(done, saved, record.meta(), which=which)

    def evaluate_and_keep_best(done, state):
        """Validation metrics, and a new best saved at once; returns the arrays that save
        was given, if any, for the latest checkpoint of the same step."""
        trained_s = record.train_time_s()  # up to this evaluation, the earlier ones included
        val = validation_metrics(state.params, final=done == total_steps)
        writer.write(done, "val", dict(val, train_time_s=trained_s))
        results.update(prefixed("val", val))
        progress.write(f"step {done}: " + ", ".join(f"val {k} {v:.4f}" for k, v in val.items()))
        record.last_val = val
        improves = record.improves(val["loss"])
        # A resumed run may replay the step of its best checkpoint: not a miss for patience.
        record.evaluations_since_best = (0 if improves or done == record.best_step
                                         else record.evaluations_since_best + 1)
        if not improves:
            return None
        record.best_loss, record.best_step = val["loss"], done
        saved = parallel.to_saved(state, par)
        checkpoint(done, saved, which="best")
        return saved

    early = EarlyStopping(config)

    def end_early(done, reason):
        writer.write(done, "early_stop", dict(best_step=record.best_step,
                                              best_val_loss=record.best_loss,
                                              evaluations_since_best=record.evaluations_since_best))
        progress.write(f"early stopping at step {done}: {reason}; the best checkpoint is step "
                       f"{record.best_step}")
        results["early_stopped"] = reason

    # --- the loop ---------------------------------------------------------------------------
    def train_steps(state):
        """The steps from `start` to the end, or to a stop request; returns the last state."""
        p_train = par.compile(functools.partial(train_step, loss_fn=task.loss, tx=tx),
                              (state_specs(), parallel.BATCH), (state_specs(), P()), donate=True)
        window = None
        if profile_steps is not None and jax.process_index() == 0:
            window = profiling.StepWindow(profile_steps, os.path.join(workdir, PROFILE_DIR))
        record.started = time.perf_counter()
        pending, fetched = [], []  # metrics on the devices; on the host, not yet logged
        feed = Feed(task.train_batch, par.batch, start, total_steps,
                    resume_state=record.data_state)
        try:
            with StopRequest() as stop:
                for step in range(start, total_steps):
                    done = step + 1
                    if window is not None:
                        window.before(done, state)
                    state, metrics = p_train(state, feed.take())
                    record.data_state = feed.state
                    stopping = stop.after(done) or (stop_after is not None
                                                    and done - start >= stop_after)
                    if not stopping:
                        feed.transfer_next()  # while this step runs
                    if window is not None:
                        window.after(done, state)
                    pending.append((step, metrics))
                    last = done == total_steps or stopping
                    do_log = done % config.log_every == 0 or last
                    do_eval = done % config.eval_every == 0 or done == total_steps
                    do_save = done % config.checkpoint_every == 0 or last or done in keep_steps
                    if not (do_log or do_eval or do_save):
                        continue
                    fetched += _fetch(pending, par)
                    pending = []
                    if do_log:
                        log(done, fetched)
                        fetched = []
                    saved = evaluate_and_keep_best(done, state) if do_eval else None
                    ended = do_eval and done != total_steps and early.reason(
                        record.evaluations_since_best, record.last_val)
                    if do_save or ended:
                        checkpoint(done, parallel.to_saved(state, par) if saved is None
                                   else saved)
                    results["step"] = done
                    if ended:
                        if fetched:
                            log(done, fetched)
                        end_early(done, ended)
                        break
                    if stopping and done != total_steps:
                        progress.write(f"stopped early: saved step {done} to "
                                       f"{workdir}/checkpoints")
                        results["stopped"] = True
                        break
        finally:
            feed.close()
            if window is not None:
                window.close()
                progress.write(window.summary())
        return state

    try:
        ended = early.reason(record.evaluations_since_best, record.last_val) if start else None
        if start < total_steps and not ended:
            if start:
                progress.write(f"resumed from step {start} in {workdir}")
            state = train_steps(state)
        else:
            if ended:
                results["early_stopped"] = ended
            status = f"stopped early: {ended}" if ended else f"{start} steps"
            progress.write(f"{workdir} has finished ({status}); evaluating its last checkpoint")
            save_files()  # the settings that may change (evaluation, say) are this call's
    except BaseException:
        _close(progress, writer, ckpts, failed=True)
        raise
    _close(progress, writer, ckpts, failed=False)

    # --- what the run reports ---------------------------------------------------------------
    results["train_time_s"] = record.train_time_s()
    if start >= total_steps or results.get("early_stopped"):  # as at the last step: test too
        results.update(prefixed("val", validation_metrics(state.params, final=True)))
    if record.best_loss is not None:
        results.update(prefixed("best_val", task.report({"loss": record.best_loss})),
                       best_step=record.best_step)
    if task.generate is not None and not results.get("stopped") and config.get("sample"):
        results["sample"] = task.generate(par.unreplicate(state.params),
                                          jax.random.PRNGKey(config.seed), **config.sample)
    return results
