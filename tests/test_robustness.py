"""What a hostile user, a full disk or a crashed node does to a run: a failed checkpoint write
ends the run at once, a damaged checkpoint costs that checkpoint only, one workdir holds one run,
and bad input is one `error:` line that leaves the workdir as it was."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from seqjax.train import saved_runs
from seqjax.train.checkpoint import DamagedCheckpoint
from seqjax.train.lock import LOCK_FILE
from seqjax.train.loop import train_and_evaluate

from conftest import ROOT, launch, load_config, restored

TINY = ("--config", "experiments/charlm.py:tiny")
LONG = ("--config.num_train_steps=100000", "--config.eval_every=100000")


def _start(workdir, *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *TINY, "--workdir",
                             str(workdir), *LONG, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(path, proc, timeout=90):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


def _hashes(directory) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny char-LM run with checkpoints at steps 10 and 20."""
    workdir = tmp_path_factory.mktemp("robust") / "run"
    train_and_evaluate(load_config("charlm", "tiny"), str(workdir))
    return workdir


# ----------------------------------------------------------------------------- failed writes

def test_a_failed_checkpoint_write_ends_the_run_at_once(tmp_path):
    workdir = tmp_path / "w"
    proc = _start(workdir, "--config.checkpoint_every=10")
    _wait_for(workdir / "checkpoints" / "10", proc)
    (tmp_path / "kept").mkdir()
    (workdir / "checkpoints").rename(tmp_path / "kept" / "checkpoints")
    for attempt in range(100):  # the run may create the directory again in between
        try:
            (workdir / "checkpoints").write_text("not a directory")
            break
        except IsADirectoryError:
            (workdir / "checkpoints").rename(tmp_path / "kept" / f"again-{attempt}")
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run stayed alive after its checkpoint write failed")
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert proc.returncode == 1 and last.startswith("error: a checkpoint write in"), err[-2000:]
    assert "the checkpoints written before it are kept" in last
    assert not (workdir / LOCK_FILE).exists()
    assert int(restored(tmp_path / "kept")["step"]) >= 10


# ----------------------------------------------------------------------------- damaged checkpoints

def _truncate(path):
    data = max((p for p in (path / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)


def _randomize(path):
    data = max((p for p in (path / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    data.write_bytes(np.random.default_rng(0).bytes(data.stat().st_size))


DAMAGES = {
    "truncated": (20, _truncate),
    "random bytes": (20, _randomize),
    "no _METADATA": (20, lambda path: (path / "state" / "_METADATA").unlink()),
    "empty newer directory": (30, lambda path: path.mkdir()),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_costs_that_checkpoint_only(trained, tmp_path, damage, capsys):
    step, harm = DAMAGES[damage]
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    harm(workdir / "checkpoints" / str(step))
    fallback = 10 if step == 20 else 20

    # Evaluation uses the newest checkpoint that reads back and says which one it skipped;
    # asked for the damaged one, it names it.
    assert saved_runs.evaluate(None, str(workdir))["step"] == fallback
    assert f"skipped damaged checkpoint {workdir / 'checkpoints' / str(step)}" in \
        capsys.readouterr().err
    with pytest.raises(DamagedCheckpoint, match=str(workdir / "checkpoints" / str(step))):
        saved_runs.evaluate(None, str(workdir), step=step)

    # Training resumes from it, sets the damaged one aside, and replays the same steps.
    config = load_config("charlm", "tiny")
    config.num_train_steps = 30 if step == 30 else 20
    train_and_evaluate(config, str(workdir))
    out = capsys.readouterr().out
    assert f"resumed from step {fallback}" in out and "skipped damaged checkpoint" in out
    assert (workdir / "damaged" / f"checkpoints-{step}").is_dir()
    if step == 20:  # the replayed step 20 is the undamaged run's step 20, bit for bit
        for a, b in zip(jax.tree.leaves(restored(workdir)), jax.tree.leaves(restored(trained))):
            np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_another_model_is_refused_not_skipped(trained, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    (workdir / "config.json").unlink()  # nothing tells the configs apart but the arrays
    before = _hashes(workdir)
    config = load_config("charlm", "tiny")
    config.model.hidden = 48
    with pytest.raises(ValueError, match="checkpoint .* does not fit this model: parameter"):
        train_and_evaluate(config, str(workdir))
    assert _hashes(workdir) == before and not (workdir / "damaged").exists()


# ----------------------------------------------------------------------------- one run per workdir

def test_a_second_run_on_a_workdir_is_refused_and_a_stale_lock_recovered(tmp_path):
    workdir = tmp_path / "w"
    first = _start(workdir)
    _wait_for(workdir / LOCK_FILE, first)
    second = launch(*TINY, "--workdir", str(workdir), *LONG)
    line = _one_error_line(second)
    assert f"in use by another run (pid {first.pid} on " in line and LOCK_FILE in line
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert (workdir / LOCK_FILE).exists()  # left behind by the killed run
    third = launch(*TINY, "--workdir", str(workdir), "--config.num_train_steps=20")
    assert third.returncode == 0, third.stderr
    assert "removed the stale lock" in third.stdout and not (workdir / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- bad input

BAD_INPUTS = {
    "no config file": (["--config", "experiments/nonexistent.py"], "no such file"),
    "config is a directory": (["--config", "experiments"], "not an experiment file"),
    "config is not Python": (["--config", "README.md"], "not an experiment file"),
    "no get_config": (["--config", "seqjax/plotting.py"], "defines no get_config"),
    "--step in train mode": ([*TINY, "--step", "10"], "training resumes from the latest"),
    "export into a directory": ([*TINY, "--mode", "export", "--out", "{tmp}"],
                                "is a directory"),
    "no letters in the corpus": ([*TINY, "--config.data.path={tmp}/digits.txt"],
                                 "holds no text after preprocessing"),
    "init_from is a file": (["--config", "experiments/bert_finetune.py:smoke",
                             "--config.init_from={tmp}/digits.txt", "--workdir={tmp}/ft"],
                            "is a file, not the workdir of a run"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_changes_nothing(trained, tmp_path, case):
    args, message = BAD_INPUTS[case]
    (tmp_path / "digits.txt").write_text("1234 5678 !!!\n")
    before = _hashes(trained)
    proc = launch(f"--workdir={trained}", *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert message in _one_error_line(proc)
    assert _hashes(trained) == before
    assert sorted(os.listdir(tmp_path)) == ["digits.txt"]  # no .tmp.npz left


@pytest.mark.parametrize("workdir", ["", "  ", "{file}"])
def test_an_empty_workdir_or_a_file_is_refused(tmp_path, workdir):
    (tmp_path / "file").write_text("x")
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config",
                           str(ROOT / "experiments" / "charlm.py") + ":tiny",
                           "--workdir", workdir.replace("{file}", str(tmp_path / "file"))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    _one_error_line(proc)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_run_that_fails_keeps_the_saved_config(trained, tmp_path, monkeypatch):
    """A non-finite loss before the first checkpoint of a resumed run: config.json stays the
    one its checkpoints were written with."""
    from seqjax.data import text as text_lib
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    before = (workdir / "config.json").read_bytes()
    original = text_lib.LMBatches.__call__

    def poisoned(self, step):
        batch = original(self, step)
        batch["weights"] = np.full(batch["targets"].shape, np.nan, np.float32)
        return batch

    monkeypatch.setattr(text_lib.LMBatches, "__call__", poisoned)
    config = load_config("charlm", "tiny")
    config.num_train_steps, config.opt.lr = 40, 0.5
    with pytest.raises(FloatingPointError):
        train_and_evaluate(config, str(workdir))
    assert (workdir / "config.json").read_bytes() == before
