"""Two processes on 127.0.0.1 (gloo CPU collectives, 2 CPU devices each) train the tiny char LM
to the same parameters as one process with 4 devices and the same global batch."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from seqjax.train.loop import train_and_evaluate
from seqjax.train.metrics import METRICS_FILE

from conftest import ROOT, load_config, logged, restored

STOPPED = 75  # launch.py's exit code of a run stopped after saving


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two_processes(workdir, *overrides, config="experiments/charlm.py:tiny"):
    """Starts both processes; returns them and their (stdout, stderr) files. Output goes to
    files, not pipes: a process blocked on a full pipe would stall the other one inside a
    collective."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    address = f"127.0.0.1:{_free_port()}"
    call = len(list(workdir.parent.glob(f"{workdir.name}_*_0.out")))  # keep every call's logs
    logs = [(workdir.parent / f"{workdir.name}_{call}_{i}.out",
             workdir.parent / f"{workdir.name}_{call}_{i}.err") for i in range(2)]
    procs = []
    for i, (out, err) in enumerate(logs):
        with open(out, "w") as stdout, open(err, "w") as stderr:
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "launch.py"), "--config", config,
                 "--workdir", str(workdir), "--coordinator_address", address,
                 "--num_processes", "2", "--process_id", str(i), "--config.log_every=1",
                 *overrides], cwd=ROOT, env=env, stdout=stdout, stderr=stderr))
    return procs, logs


def _finish(procs, logs, returncode: int = 0) -> list[str]:
    """Waits for both processes to exit with `returncode`; returns their stdouts."""
    try:
        for p, (_, err) in zip(procs, logs):
            p.wait(timeout=300)
            assert p.returncode == returncode, err.read_text()[-3000:]
    finally:  # a failed process leaves the other waiting for it in a collective
        for p in procs:
            p.kill()
    return [out.read_text() for out, _ in logs]


def _run_two_processes(workdir, *overrides, **kwargs):
    return _finish(*_start_two_processes(workdir, *overrides, **kwargs))


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
    config = load_config("charlm", "tiny")
    config.log_every = 1
    single, multi = tmp_path / "single", tmp_path / "multi"
    train_and_evaluate(config, str(single))
    first = _run_two_processes(multi)
    # Both resume for 4 more steps: a run started on 2 processes resumes on 2.
    config.num_train_steps += 4
    train_and_evaluate(config, str(single))
    outputs = _run_two_processes(multi, f"--config.num_train_steps={config.num_train_steps}")
    assert jax.local_device_count() == 4
    assert "val_perplexity" in outputs[0] and "resumed from step 20" in outputs[0]
    # Only process 0 prints. Process 1's stdout holds gloo's connection messages, written by
    # several threads at once and so cut anywhere (a line may be a lone "3"): look for the
    # engine's words rather than for lines that are not gloo's.
    engine_words = ("step", "loss", "perplexity", "resumed", "sample")
    assert all(word in outputs[0] for word in engine_words)
    for text in (first[1], outputs[1]):
        assert not [word for word in engine_words if word in text], text
    a, b = restored(single), restored(multi)
    assert int(a["step"]) == int(b["step"]) == config.num_train_steps
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    # One metrics file, each logged step once, and the same training curve.
    files = [p for p in multi.rglob("metrics*.jsonl")]
    assert [p.name for p in files] == ["metrics.jsonl"]
    assert [r["step"] for r in logged(multi)] == list(range(1, config.num_train_steps + 1))
    np.testing.assert_allclose([r["loss"] for r in logged(multi)],
                               [r["loss"] for r in logged(single)], atol=1e-5)


def test_sigterm_on_one_process_stops_both_at_the_same_step(tmp_path):
    """Only process 1 gets SIGTERM: both stop after the same step (the checkpoint of that step
    is complete: its save is a collective of both), exit as a stopped run, and resuming on two
    processes reaches the parameters of a run that was never interrupted."""
    workdir = tmp_path / "preempted"
    constant = ("--config.opt.schedule=constant", "--config.eval_every=100000",
                "--config.checkpoint_every=100000")
    procs, logs = _start_two_processes(workdir, "--config.num_train_steps=100000", *constant)
    deadline = time.time() + 120
    while not (workdir / METRICS_FILE).exists() or not (workdir / METRICS_FILE).read_text():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, \
            [err.read_text()[-2000:] for _, err in logs]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    first = _finish(procs, logs, returncode=STOPPED)
    step = int(restored(workdir)["step"])
    assert f"stopped early: saved step {step} " in first[0]
    assert "SIGTERM caught" in logs[1][1].read_text()
    more = (f"--config.num_train_steps={step + 3}", *constant)
    _run_two_processes(workdir, *more)
    reference = tmp_path / "uninterrupted"
    _run_two_processes(reference, *more)
    a, b = restored(reference), restored(workdir)
    assert int(a["step"]) == int(b["step"]) == step + 3
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


_AGREE_ON_FILES = """
import hashlib, json, os, sys, tempfile
import numpy as np
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
address, index = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=index)
from seqjax import tasks
from seqjax.config import load_experiment
from seqjax.data.text import Vocab
from seqjax.train.loop import _with_process_zero_files
config = load_experiment("experiments/charlm.py").get_config("tiny")
workdir = None
if index == 1:  # process 1 reads a vocabulary in another order, as a tokenizer trained apart
    built = json.loads(tasks.build(config).files["vocab.json"])
    vocab = Vocab.from_json(json.dumps(built))
    vocab._set_tokens([vocab.idx_to_token[0], *reversed(vocab.idx_to_token[1:])])
    workdir = tempfile.mkdtemp()
    with open(os.path.join(workdir, "vocab.json"), "w") as f:
        f.write(vocab.to_json())
task = tasks.build(config, workdir)
digest = lambda task: hashlib.sha256(b"".join(
    np.asarray(x).tobytes() for x in jax.tree.leaves(task.train_batch(0)))).hexdigest()
before, files_before = digest(task), task.files
task = _with_process_zero_files(config, task)
after = digest(task)
print("RESULT", json.dumps({"before": before, "after": after, "files_before": files_before,
                           "files": task.files}))
"""


def test_every_process_reads_text_with_process_zeros_vocabulary(tmp_path):
    """Vocabularies and tokenizers trained on each process of a fresh run can differ (the
    tokenizers library breaks ties in hash-map order); every process takes process 0's."""
    address, env = f"127.0.0.1:{_free_port()}", dict(os.environ, XLA_FLAGS="")
    procs = []
    for i in range(2):
        with open(tmp_path / f"{i}.out", "w") as out, open(tmp_path / f"{i}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", _AGREE_ON_FILES, address, str(i)],
                                          cwd=ROOT, env=env, stdout=out, stderr=err))
    try:
        for i, p in enumerate(procs):
            assert p.wait(timeout=120) == 0, (tmp_path / f"{i}.err").read_text()[-3000:]
    finally:
        for p in procs:
            p.kill()
    results = [json.loads(next(line[7:] for line in (tmp_path / f"{i}.out").read_text()
                                .splitlines() if line.startswith("RESULT ")))
               for i in range(2)]
    assert results[0]["files_before"] != results[1]["files_before"]
    assert results[0]["files"] == results[1]["files"] == results[0]["files_before"]
    # Each process reads its own rows of a batch: process 0's stay, process 1's are re-encoded.
    assert results[0]["after"] == results[0]["before"]
    assert results[1]["after"] != results[1]["before"]
