"""Metrics: means from the sums that losses report, `workdir/metrics.jsonl` and TensorBoard, and
a progress bar on the terminal.

Only process 0 writes; on other processes every method is a no-op. A workdir in a bucket gets
both files through `seqjax.files` (TensorBoard's event files too, by a tensorboardX writer
factory): an object cannot be appended to, so each is rewritten whole, metrics.jsonl at most
every UPLOAD_EVERY_S seconds and when the run ends.
"""

import json
import math
import os
import time

import jax
import tqdm

from seqjax import files

METRICS_FILE = "metrics.jsonl"
UPLOAD_EVERY_S = 30.0


def means(sums: dict, denominators: dict) -> dict:
    """Means from sums: each divided by 'weight', or by the sum `denominators` names for it."""
    below = {"weight", *denominators.values()}
    return {k: v / sums[denominators.get(k, "weight")] for k, v in sums.items() if k not in below}


def train_summary(fetched: list[dict], denominators: dict) -> dict:
    """The means over several steps' summed metrics, and their mean gradient norm."""
    sums = {k: sum(m[k] for m in fetched) for k in fetched[0] if k != "grad_norm"}
    return dict(means(sums, denominators),
                grad_norm=sum(m["grad_norm"] for m in fetched) / len(fetched))


def prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


class MetricWriter:
    """Appends one JSON object per (step, split) line and mirrors scalars to TensorBoard.

    When a run resumes from step s, lines after s (written after the last checkpoint by the
    run that stopped) are dropped so that the file holds one history, as the checkpoint does,
    and so is a partial last line left by a run killed while writing it.
    """

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.path = os.path.join(workdir, METRICS_FILE)
        if files.exists(self.path):
            self._truncate_after(resume_step)
        self.file = files.Appender(self.path, UPLOAD_EVERY_S)
        from tensorboardX import SummaryWriter, record_writer  # imported here: slow to import
        if not files.is_local(workdir):
            scheme = workdir.partition("://")[0]
            record_writer.register_writer_factory(scheme, _EventFiles())
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _truncate_after(self, step: int):
        lines = files.read_text(self.path).splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]
        if len(kept) != len(lines):
            files.write_text(self.path, "".join(kept))

    def write(self, step: int, split: str, metrics: dict):
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.file.write((json.dumps(record) + "\n").encode("utf-8"))
        self.file.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{split}/{k}", float(v), step)

    def flush(self):
        """Writes out the metrics held back (in a bucket, up to UPLOAD_EVERY_S seconds of them):
        the loop calls it with each checkpoint, so that a run killed later and resumed from that
        checkpoint has every line up to it."""
        if self.enabled:
            self.file.flush(force=True)

    def close(self):
        if self.enabled:
            self.file.close()
            self.tb.close()


def read_metrics(workdir: str, split: str) -> list[dict]:
    """The records of one split ('train', 'val') of a workdir's metrics, in order; a line cut
    short by a killed run is skipped."""
    records = []
    for line in files.read_text(os.path.join(workdir, METRICS_FILE)).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("split") == split:
            records.append(record)
    return records


class _EventFiles:
    """tensorboardX's writer factory (`record_writer.register_writer_factory`) for the event
    files of a workdir in a bucket: written through `seqjax.files` like every other file of the
    run, with its credentials and settings, rather than by tensorboardX's own clients (boto3,
    google-cloud-storage), which reach S3 and GCS only."""

    def open(self, path):
        return files.Appender(path)

    def directory_check(self, path):
        files.makedirs(path)


def _step_of(line: str) -> float:
    """The step of a metrics line; infinity for a line that is not a whole JSON record."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _jsonable(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)


class Progress:
    """tqdm bar with steps/s and ETA (tqdm's own) and tokens/s, loss and lr as postfix."""

    def __init__(self, total: int, initial: int, tokens_per_step: int):
        self.bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             disable=jax.process_index() != 0, mininterval=1.0)
        self.tokens_per_step = tokens_per_step
        self.last = (initial, time.perf_counter())

    def update(self, step: int, **postfix):
        now = time.perf_counter()
        steps = step - self.last[0]
        if steps > 0:
            postfix["tok/s"] = f"{steps * self.tokens_per_step / (now - self.last[1]):.3g}"
            self.bar.update(steps)
        self.last = (step, now)
        self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v
                              for k, v in postfix.items()}, refresh=False)

    def write(self, message: str):
        if jax.process_index() == 0:
            self.bar.write(message)

    def close(self):
        self.bar.close()
