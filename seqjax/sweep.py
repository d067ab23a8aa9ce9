"""Sweeps: each point of an experiment's `get_sweep()` (a list of override dicts, e.g. from
`product`) is trained in its own sub-workdir named after its overrides, one after another in
this process or `parallel` at a time as separate processes.

A point's row of the summary is written to `<workdir>/<point>/result.json` when the point ends
(finished, stopped or failed), so a failed point never stops the others, a rerun of the same
command skips the points that finished and resumes the others from their checkpoints, and a
summary (`summary.csv`, `summary.md`, `summary.png`) can be written at any time. The workdir may
be a bucket (gs://bucket/sweep): every file goes through `seqjax.files`, and only process 0
writes them.
"""

import itertools
import json
import os
import subprocess
import tempfile
import time
import traceback

from seqjax import config as config_lib
from seqjax import files, plotting

RESULT_FILE = "result.json"
LOG_FILE = "log.txt"
HIGHER_IS_BETTER = ("accuracy", "bleu")


def product(grid: dict) -> list[dict]:
    """Every combination of the value lists of `grid`, the last key varying fastest:
    product({'model.cell': ('rnn', 'gru'), 'opt.lr': (1e-3, 3e-3)}) is 4 override dicts."""
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"sweep.product: {key!r} needs a non-empty list of values, "
                             f"got {values!r}")
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def point_name(overrides: dict) -> str:
    """'model.cell=gru,opt.lr=0.001': the sub-workdir of a point."""
    return ",".join(f"{k}={v}".replace(os.sep, "_") for k, v in overrides.items())


def check_points(points, config) -> list[dict]:
    """The override dicts of `get_sweep()`, each checked against `config` before anything runs:
    an unknown field or a value of the wrong type is an error naming the point."""
    if not isinstance(points, (list, tuple)) or not points or \
            not all(isinstance(p, dict) and p for p in points):
        raise ValueError(f"get_sweep() must return a non-empty list of non-empty override dicts, "
                         f"got {points!r}")
    names = [point_name(p) for p in points]
    if len(set(names)) < len(names):
        repeated = sorted(n for n in names if names.count(n) > 1)
        raise ValueError(f"get_sweep() repeats a point: {repeated[0]}")
    for overrides in points:
        apply(config, overrides)
    return list(points)


def apply(config, overrides: dict):
    """A copy of `config` with the point's overrides ('a.b' keys) set."""
    return config_lib.override(config, overrides, f"sweep point {point_name(overrides)}")


def run_point(config, overrides: dict, workdir: str) -> dict:
    """Trains one point in its sub-workdir (skipped when it has finished with this config) and
    writes its row; an exception is the point's failure, recorded, not raised."""
    import jax

    from seqjax.train.checkpoint import CheckpointError
    from seqjax.train.loop import train_and_evaluate
    name = point_name(overrides)
    subdir = os.path.join(workdir, name)
    point = apply(config, overrides)
    row = _finished_row(point, subdir)
    if row is not None:
        print(f"=== sweep point {name}: finished, skipped")
        return row
    print(f"=== sweep point {name}", flush=True)
    if jax.process_index() == 0:
        _forget(subdir)
    error = None
    try:
        results = train_and_evaluate(point, subdir)
        status = "stopped" if results.get("stopped") else "ok"
    except Exception as e:
        traceback.print_exc()
        results, status, error = {}, f"failed: {type(e).__name__}: {e}", e
    row = {"point": name, **overrides, "status": status,
           **{k: v for k, v in results.items() if k not in ("sample", "stopped")}}
    if isinstance(error, CheckpointError):  # the disk, not the point: stop the sweep
        try:
            _write_json(os.path.join(subdir, RESULT_FILE), row)
        finally:
            raise error
    _write_json(os.path.join(subdir, RESULT_FILE), row)
    return row


def run(config, points, workdir: str, *, parallel: int = 1, command=None) -> bool:
    """Runs every point: in this process one after another, or with `parallel` > 1 as worker
    processes `command(i)` (training point i), `parallel` at a time, each with its output in
    `<point>/log.txt` (in a bucket, copied there when the point ends). SIGTERM stops the sweep
    after the running points have saved. Returns whether it was stopped."""
    from seqjax.train.stopping import StopRequest
    with StopRequest() as stop:
        if parallel <= 1:
            for overrides in points:
                if stop.requested:
                    break
                run_point(config, overrides, workdir)
        else:
            _run_workers(config, points, workdir, command, parallel, stop)
    return stop.requested


def _run_workers(config, points, workdir: str, command, parallel: int, stop):
    waiting = []
    for i, overrides in enumerate(points):
        subdir = os.path.join(workdir, point_name(overrides))
        if _finished_row(apply(config, overrides), subdir) is not None:
            print(f"=== sweep point {point_name(overrides)}: finished, skipped")
            continue
        _forget(subdir)  # the worker writes a new row; none if it dies first
        waiting.append(i)
    running, stopping = {}, False
    while waiting or running:
        if stop.requested and not stopping:
            waiting, stopping = [], True
            for proc, _ in running.values():
                proc.terminate()  # each saves its checkpoint and exits
        while waiting and len(running) < parallel:
            i = waiting.pop(0)
            subdir = os.path.join(workdir, point_name(points[i]))
            files.makedirs(subdir)
            log = _open_log(os.path.join(subdir, LOG_FILE))
            print(f"=== sweep point {point_name(points[i])}: started (output in {log.name})",
                  flush=True)
            running[i] = (subprocess.Popen(command(i), stdout=log, stderr=subprocess.STDOUT), log)
        for i, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[i]
            subdir = os.path.join(workdir, point_name(points[i]))
            log_path = _close_log(log, os.path.join(subdir, LOG_FILE))
            path = os.path.join(subdir, RESULT_FILE)
            if _read_json(path) is None:  # killed, or failed before it could record itself
                _write_json(path, {"point": point_name(points[i]), **points[i],
                                   "status": f"failed: exit code {proc.returncode} "
                                             f"(see {log_path})"})
            print(f"=== sweep point {point_name(points[i])}: {_read_json(path)['status']}",
                  flush=True)
        time.sleep(0.2)


def _open_log(path: str):
    """The file a worker's output goes to: `path`, appended to; for a sub-workdir in a bucket,
    which a child process cannot write to, a local temporary file (see `_close_log`)."""
    if files.is_local(path):
        return open(path, "a", encoding="utf-8")
    return tempfile.NamedTemporaryFile("w", prefix="seqjax-sweep-log-", suffix=".txt",
                                       delete=False)


def _close_log(log, path: str) -> str:
    """Closes a worker's log; one in a local temporary file is appended to `path` in the
    bucket. Returns `path`."""
    log.close()
    if not files.is_local(path):
        with open(log.name, "rb") as f:
            output = f.read()
        os.remove(log.name)
        in_bucket = files.Appender(path)
        in_bucket.write(output)
        in_bucket.close()
    return path


def summarize(points, workdir: str, metric: str = "best_val_loss") -> list[dict]:
    """Writes summary.csv, summary.md (sorted by `metric`, best first) and summary.png (the
    metric's curve of every point) from the points' results; returns the sorted rows."""
    from seqjax.train.metrics import METRICS_FILE
    rows = []
    for overrides in points:
        subdir = os.path.join(workdir, point_name(overrides))
        row = _read_json(os.path.join(subdir, RESULT_FILE))
        if row is None:
            started = files.exists(os.path.join(subdir, METRICS_FILE))
            row = {"point": point_name(overrides), **overrides,
                   "status": "interrupted" if started else "not run"}
        rows.append(row)
    sign = -1 if any(word in metric for word in HIGHER_IS_BETTER) else 1

    def order(row):  # best first; rows without the metric (failed, not run) last
        value = row.get(metric)
        return (0, sign * value) if isinstance(value, (int, float)) else (1, 0)

    rows.sort(key=order)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    files.makedirs(workdir)
    files.write_csv(os.path.join(workdir, "summary.csv"), rows, keys)
    columns = ["point", "status", "step", metric, "best_step"] + [
        k for prefix in ("best_val_", "val_", "test_") for k in keys if k.startswith(prefix)]
    files.write_from_process_0(os.path.join(workdir, "summary.md"), plotting.markdown_table(
        rows, list(dict.fromkeys(c for c in columns + ["train_time_s", "early_stopped"]
                                 if c in keys))))
    _plot(rows, workdir, metric)
    return rows


def _plot(rows: list[dict], workdir: str, metric: str):
    """summary.png: the logged curve behind `metric` ('best_val_loss' -> the 'val' rows'
    'loss') against the step, one line per point."""
    import jax

    from seqjax.train.metrics import METRICS_FILE, read_metrics
    if jax.process_index() != 0:  # only process 0 writes it: no need to read and draw
        return
    name = metric.removeprefix("best_")
    split, _, key = name.partition("_")
    if not key:
        split, key = "val", name
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        subdir = os.path.join(workdir, row["point"])
        if not files.exists(os.path.join(subdir, METRICS_FILE)):
            continue
        curve = [(r["step"], r[key]) for r in read_metrics(subdir, split) if key in r]
        if curve:
            ax.plot(*zip(*curve), label=row["point"], marker="." if len(curve) < 30 else None)
    ax.set_title(f"sweep {os.path.basename(files.absolute(workdir))}: {split} {key}")
    plotting.save_lines(fig, ax, os.path.join(workdir, "summary.png"), xlabel="step",
                        ylabel=f"{split} {key}")


def _finished_row(point, subdir: str) -> dict | None:
    """The recorded row of a point that finished (all its steps, or stopped early) with this
    very config."""
    row = _read_json(os.path.join(subdir, RESULT_FILE))
    saved = config_lib.load(subdir) if row else None
    if row is None or saved is None or row.get("status") != "ok" or (
            row.get("step") != point.num_train_steps and not row.get("early_stopped")):
        return None
    now = json.loads(json.dumps(config_lib.flatten(point), default=str))
    return row if not config_lib.differences(config_lib.flatten(saved), now) else None


def _forget(subdir: str):
    """Removes a point's row before it runs, so that a row is never older than its run."""
    files.remove(os.path.join(subdir, RESULT_FILE))


def _read_json(path: str) -> dict | None:
    try:
        return json.loads(files.read_text(path))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: str, row: dict):
    """Writes a point's row (by process 0)."""
    files.makedirs(os.path.dirname(path))
    files.write_from_process_0(path, json.dumps(row, indent=1, default=str))
