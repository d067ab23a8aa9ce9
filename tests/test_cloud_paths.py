"""A workdir in a bucket: the tiny char LM trains, resumes, evaluates and exports with every file
in a fake Google Cloud Storage server on 127.0.0.1 (gcp-storage-emulator, in memory), reached
by the clients a real gs:// workdir uses: epath through gcsfs (config, vocabulary, metrics,
TensorBoard, lock, sweep files, plots, export), tensorstore (orbax's arrays) and
google-cloud-storage (orbax's questions about the bucket). Nothing may land on the local disk."""

import functools
import gzip
import http.server
import importlib.resources
import io
import json
import os
import re
import socket
import struct
import threading
import urllib.parse

import fsspec
import numpy as np
import pytest

from seqjax import files, sweep
from seqjax.data.text import load_text
from seqjax.train import metrics, saved_runs
from seqjax.train.checkpoint import Checkpoints, has_latest
from seqjax.train.lock import WorkdirLock
from seqjax.train.loop import train_and_evaluate

from conftest import load_config, restored

BUCKET = "seqjax-test"


class _QuietServer(http.server.HTTPServer):
    def handle_error(self, request, client_address):
        """A client that hangs up before the answer (gcsfs races two requests for one `info`)
        is no error of the test."""


def _handler(storage):
    """The emulator's request handler, adding the header that GCS sends with an object's bytes
    and tensorstore reads: the object's generation (without it, tensorstore's re-read of an OCDBT
    manifest fails now and then with 'Malformed StorageGeneration')."""
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.server import RequestHandler

    class Handler(RequestHandler):
        def end_headers(self):
            url = urllib.parse.urlsplit(self.path)
            media = re.fullmatch(r".*/b/([^/]+)/o/([^/]+)", url.path)
            if self.command == "GET" and media and "alt=media" in url.query:
                try:
                    found = self.storage.get_file_obj(media[1], urllib.parse.unquote(media[2]))
                    self.send_header("x-goog-generation", found["generation"])
                except NotFound:
                    pass
            super().end_headers()

    return functools.partial(Handler, storage)


@pytest.fixture(scope="module")
def bucket():
    """gs://seqjax-test on a fake server; the environment points every client at it, and keeps
    google-auth from looking for a metadata server (off this machine) for credentials."""
    from gcp_storage_emulator.handlers import buckets
    from gcp_storage_emulator.storage import Storage
    storage = Storage(use_memory_fs=True)
    buckets.create_bucket(BUCKET, storage)
    server = _QuietServer(("127.0.0.1", 0), _handler(storage))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake", "NO_GCE_CHECK": "true",
                            "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
                            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}.items():
            env.setenv(name, value)
        env.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
        yield f"gs://{BUCKET}"
    server.shutdown()
    server.server_close()


def _records(data: bytes) -> list[bytes]:
    """The records of a TensorBoard event file (TFRecord: length, its CRC, data, its CRC); an
    event file cut short, or rewritten out of order, fails here."""
    records, at = [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        records.append(data[at + 12:at + 12 + length])
        at += 12 + length + 4
    assert at == len(data) and all(len(r) for r in records)
    return records


def test_a_run_resumes_evaluates_and_exports_in_a_bucket(bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a path taken for a local one would land here
    corpus = importlib.resources.files("seqjax.data").joinpath("timemachine/timemachine.txt")
    files.write_bytes(f"{bucket}/data/timemachine.txt.gz", gzip.compress(corpus.read_bytes()))
    config = load_config("charlm", "tiny")
    config.data.path = f"{bucket}/data/timemachine.txt.gz"
    overrides = {"seed": 0}  # a sweep point with the config's own seed: the same run
    sweeps, point = f"{bucket}/sweep", sweep.point_name(overrides)
    workdir = f"{sweeps}/{point}"
    # metrics.jsonl goes up with each checkpoint, however long the upload interval.
    monkeypatch.setattr(metrics, "UPLOAD_EVERY_S", 3600.0)
    logged_at_saves, save = [], Checkpoints.save

    def save_and_look(self, step, *args, **kwargs):
        logged_at_saves.append((step, [r["step"] for r in metrics.read_metrics(workdir, "train")]))
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpoints, "save", save_and_look)

    first = train_and_evaluate(config, workdir, stop_after=10, profile_steps=(1, 2))
    assert first["stopped"] and has_latest(workdir)
    assert logged_at_saves == [(10, [5, 10])] * 2  # the best checkpoint, then the latest
    assert files.listdir(f"{workdir}/checkpoints") == ["10"]
    assert files.exists(f"{workdir}/config.json") and files.exists(f"{workdir}/vocab.json")
    assert list(files.path(workdir).glob("profile/plugins/profile/*/*.xplane.pb"))
    row = sweep.run_point(config, overrides, sweeps)  # resumes the run to its end
    assert "resumed from step 10" in capsys.readouterr().out
    assert row["status"] == "ok" and row["step"] == config.num_train_steps == 20
    state = restored(workdir)
    assert int(state["step"]) == 20

    # One history in metrics.jsonl (rewritten whole in a bucket), and TensorBoard's events.
    assert [r["step"] for r in metrics.read_metrics(workdir, "train")] == [5, 10, 15, 20]
    assert [r["step"] for r in metrics.read_metrics(workdir, "val")] == [10, 20]
    events = [_records(files.read_bytes(p))
              for p in files.path(workdir).glob("tensorboard/events.*")]
    assert len(events) == 2 and all(any(b"train/loss" in r for r in e) for e in events)

    evaluated = saved_runs.evaluate(config, workdir)
    assert evaluated["step"] == 20
    assert evaluated["loss"] == pytest.approx(metrics.read_metrics(workdir, "val")[-1]["loss"])
    shapes = saved_runs.export(workdir, f"{bucket}/exports/params.npz")
    exported = np.load(io.BytesIO(files.read_bytes(f"{bucket}/exports/params.npz")))
    assert {k: exported[k].shape for k in exported.files} == shapes
    np.testing.assert_array_equal(exported["head/kernel"],
                                  state["params"]["params"]["head"]["kernel"])

    rows = sweep.summarize([overrides], sweeps)
    assert rows[0]["status"] == "ok" and "seed=0" in files.read_text(f"{sweeps}/summary.md")
    assert files.read_bytes(f"{sweeps}/summary.png").startswith(b"\x89PNG")

    ckpts = Checkpoints(workdir)  # a damaged checkpoint is moved aside: copied, then deleted
    assert ckpts.set_aside(10) == f"{workdir}/damaged/checkpoints-10"
    assert ckpts.managers["latest"].all_steps() == [20]
    ckpts.close()
    assert files.exists(f"{workdir}/damaged/checkpoints-10/state/manifest.ocdbt")
    assert not files.exists(f"{workdir}/.lock")
    assert not list(tmp_path.iterdir())


def test_the_lock_of_a_workdir_in_a_bucket(bucket):
    workdir = f"{bucket}/locked"
    other_host = {"pid": 1, "host": "another-host", "since": "2024-01-01 00:00:00"}
    files.write_text(f"{workdir}/.lock", json.dumps(other_host))
    with pytest.raises(ValueError, match="in use by another run .*another-host"):
        with WorkdirLock(workdir):
            pass
    dead = dict(other_host, pid=2 ** 22 + 1, host=socket.gethostname())  # above pid_max
    files.write_text(f"{workdir}/.lock", json.dumps(dead))
    with WorkdirLock(workdir):
        assert json.loads(files.read_text(f"{workdir}/.lock"))["pid"] == os.getpid()
        assert not files.create_new(f"{workdir}/.lock", "{}")
    assert not files.exists(f"{workdir}/.lock")


def test_files_in_a_bucket(bucket):
    path = f"{bucket}/files/log.txt"
    log = files.Appender(path, upload_every_s=3600)
    log.write(b"one\n")
    log.flush()
    assert not files.exists(path)  # not yet: an object is rewritten whole, at most hourly here
    log.close()
    log = files.Appender(path)
    log.write(b"two\n")
    log.close()
    assert files.read_text(path) == "one\ntwo\n"
    worker_log = sweep._open_log(path)  # a child process writes to a local temporary file
    worker_log.write("three\n")
    assert sweep._close_log(worker_log, path) == path
    assert files.read_text(path) == "one\ntwo\nthree\n" and not os.path.exists(worker_log.name)
    files.write_text(f"{bucket}/files/blank.txt", " \n")
    with pytest.raises(ValueError, match=f"{bucket}/files/blank.txt.*is empty"):
        load_text(f"{bucket}/files/blank.txt")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text(f"{bucket}/files/missing.txt")
    with pytest.raises(ValueError, match="not memory://"):
        files.exists("memory://run")
