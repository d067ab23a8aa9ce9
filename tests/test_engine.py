"""The engine end to end on the tiny char LM: resume, devices, SIGTERM, NaN, bad input."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from seqjax.data import text as text_lib
from seqjax.train import saved_runs
from seqjax.train.checkpoint import Checkpoints
from seqjax.train.loop import train_and_evaluate

from conftest import ROOT, launch, load_config, logged, restored


def test_resume_is_exact(tiny_charlm, tmp_path):
    config = tiny_charlm
    config.num_train_steps = 12
    config.checkpoint_every = 4
    config.model.dropout = 0.1  # the dropout keys must resume too
    train_and_evaluate(config, str(tmp_path / "once"))
    first = train_and_evaluate(config, str(tmp_path / "twice"), stop_after=6)
    assert first["stopped"] and first["step"] == 6
    with open(tmp_path / "twice" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "split": "tr')  # a run killed while writing a line
    train_and_evaluate(config, str(tmp_path / "twice"))
    once, twice = restored(str(tmp_path / "once")), restored(str(tmp_path / "twice"))
    assert int(once["step"]) == int(twice["step"]) == 12
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice)):
        np.testing.assert_array_equal(a, b)
    # metrics.jsonl holds one history: every logged step exactly once
    steps = [r["step"] for r in logged(str(tmp_path / "twice"))]
    assert steps == sorted(set(steps))


def test_one_device_equals_four(tiny_charlm, tmp_path):
    tiny_charlm.log_every = 1
    curves = {}
    for n in (1, 4):
        tiny_charlm.num_devices = n
        train_and_evaluate(tiny_charlm, str(tmp_path / f"d{n}"))
        curves[n] = [r["loss"] for r in logged(str(tmp_path / f"d{n}"))]
    assert len(curves[1]) == tiny_charlm.num_train_steps
    np.testing.assert_allclose(curves[1], curves[4], rtol=0, atol=1e-5)


def test_pmap_and_shard_map_give_the_same_parameters(tiny_charlm, tmp_path):
    """The same per-device step under pmap and under jit(shard_map) on 4 devices, with dropout
    keys, the LSTM state carried across batches, a resume in between and evaluation."""
    tiny_charlm.model.dropout = 0.1
    results = {}
    for kind in ("pmap", "shard_map"):
        tiny_charlm.parallel = kind
        workdir = str(tmp_path / kind)
        train_and_evaluate(tiny_charlm, workdir, stop_after=5)
        results[kind] = train_and_evaluate(tiny_charlm, workdir)
    assert results["pmap"]["step"] == tiny_charlm.num_train_steps
    a, b = restored(str(tmp_path / "pmap")), restored(str(tmp_path / "shard_map"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    assert abs(results["pmap"]["val_loss"] - results["shard_map"]["val_loss"]) < 1e-5
    assert saved_runs.evaluate(None, str(tmp_path / "shard_map"))["loss"] == pytest.approx(
        results["shard_map"]["val_loss"], abs=1e-6)


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_charlm, tmp_path, monkeypatch, capsys):
    workdir = str(tmp_path / "nan")
    tiny_charlm.checkpoint_every = 4
    tiny_charlm.eval_every = 2
    bad_step = 6  # the 7th step; the best checkpoint of step 6 is newer than the latest (4)
    original = text_lib.LMBatches.__call__

    def poisoned(self, step):
        batch = original(self, step)
        batch["weights"] = np.full(batch["targets"].shape, np.nan if step == bad_step else 1.0,
                                   np.float32)
        return batch

    monkeypatch.setattr(text_lib.LMBatches, "__call__", poisoned)
    with pytest.raises(FloatingPointError, match=f"non-finite loss.*step {bad_step + 1}"):
        train_and_evaluate(tiny_charlm, workdir)
    state = restored(workdir)
    assert int(state["step"]) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    assert int(restored(workdir, "best")["step"]) == 6  # newer than the latest checkpoint

    monkeypatch.undo()
    capsys.readouterr()
    results = train_and_evaluate(tiny_charlm, workdir)
    assert "resumed from step 4" in capsys.readouterr().out
    assert results["step"] == tiny_charlm.num_train_steps
    best = restored(workdir, "best")
    val = {r["step"]: r["loss"] for r in logged(workdir, "val")}
    assert int(best["step"]) == results["best_step"] == min(val, key=val.get)
    assert results["best_val_loss"] == pytest.approx(min(val.values()))
    assert results["best_val_perplexity"] == pytest.approx(np.exp(min(val.values())))


def _start_tiny_run(*args, **popen_kwargs) -> subprocess.Popen:
    """`launch.py` on the tiny char LM in the background, `args` after its config."""
    return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--config",
                             "experiments/charlm.py:tiny", *args], cwd=ROOT, **popen_kwargs)


def _terminate_when_logged(metrics, *args):
    """Starts a long tiny run, sends SIGTERM once `metrics` has a line; its stdout, after
    checking that it exited with the code of a stopped run (a scheduler may requeue it)."""
    proc = _start_tiny_run("--config.num_train_steps=100000", "--config.log_every=1",
                           "--config.eval_every=100000", *args,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while not metrics.exists() or not metrics.read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    return out


def test_sigterm_saves_and_resumes(tmp_path, capsys):
    workdir = tmp_path / "sigterm"
    out = _terminate_when_logged(workdir / "metrics.jsonl", "--workdir", str(workdir),
                                 "--config.checkpoint_every=100000")
    assert "stopped early" in out
    step = Checkpoints(str(workdir)).latest_step()
    assert step is not None and step > 0
    config = load_config("charlm", "tiny")
    config.num_train_steps = step + 3
    config.log_every = 1
    capsys.readouterr()
    assert train_and_evaluate(config, str(workdir))["step"] == step + 3
    assert f"resumed from step {step}" in capsys.readouterr().out
    steps = [r["step"] for r in logged(str(workdir))]
    assert steps == list(range(1, step + 4))


def test_launch_tiny_end_to_end(tmp_path):
    workdir = str(tmp_path / "run")
    start = time.time()
    run = launch("--config", "experiments/charlm.py:tiny", "--workdir", workdir)
    assert run.returncode == 0, run.stderr
    assert time.time() - start < 60
    assert "val_perplexity" in run.stdout and "sample: time traveller" in run.stdout
    final_val = [r for r in logged(workdir, "val")][-1]
    assert final_val["step"] == 20

    again = launch("--config", "experiments/charlm.py:tiny", "--workdir", workdir,
                    "--config.num_train_steps=25")
    assert again.returncode == 0 and "resumed from step 20" in again.stdout, again.stderr

    ev = launch("--config", "experiments/charlm.py:tiny", "--workdir", workdir, "--mode", "eval",
                 "--step", "20")
    assert ev.returncode == 0, ev.stderr
    ppl = float(next(line for line in ev.stdout.splitlines()
                     if line.startswith("perplexity:")).split()[1])
    assert ppl == pytest.approx(final_val["perplexity"], rel=1e-5)

    sample = launch("--config", "experiments/charlm.py:tiny", "--workdir", workdir,
                     "--mode", "sample", "--prefix", "the time machine", "--length", "30",
                     "--temperature", "0")
    assert sample.returncode == 0, sample.stderr
    assert (sample.stdout.startswith("the time machine")
            and len(sample.stdout.strip()) == len("the time machine") + 30)


@pytest.mark.parametrize("override, message", [
    ("--config.opt.lrr=0.1", "Did you mean"),
    ("--config.model.hidden=abc", "hidden"),
    ("--config.model.cell=transformer", "model.cell"),
    ("--config.data.batch_size=6", "split evenly over 4 devices"),
    ("--config.sample.temperature=-1", "config.sample.temperature=-1.0"),
])
def test_bad_config_is_a_clear_error(override, message, tmp_path):
    run = launch("--config", "experiments/charlm.py:tiny", "--workdir", str(tmp_path / "w"),
                 override)
    assert run.returncode != 0
    assert message in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "w").exists()


def test_bad_corpus_is_a_clear_error(tiny_charlm, tmp_path):
    tiny_charlm.data.path = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_and_evaluate(tiny_charlm, str(tmp_path / "w"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    tiny_charlm.data.path = str(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="empty"):
        train_and_evaluate(tiny_charlm, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_wrong_type_in_code_is_a_clear_error(tiny_charlm, tmp_path):
    fields = tiny_charlm.to_dict()
    fields["model"]["hidden"] = "32"  # a config built in code is not type-checked by overrides
    with pytest.raises(TypeError, match="config.model.hidden='32' has type str; expected int"):
        train_and_evaluate(ml_collections.ConfigDict(fields), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("arg, key, value, message", [
    ("tiny,cell=gru", None, None, "model.cell: 'lstm' .saved. != 'gru'"),
    ("tiny", "data.batch_size", 16, "data.batch_size: 8 .saved. != 16"),
    ("tiny", "data.preprocess", "raw", "data.preprocess"),
    ("tiny", "opt.clip_norm", 0.0, "opt.clip_norm > 0: True .saved. != False"),
    ("tiny", "opt.name", "sgd", "opt.name"),
])
def test_workdir_of_another_model_is_refused_and_kept(tiny_charlm, tmp_path, arg, key, value,
                                                      message):
    workdir = tmp_path / "w"
    tiny_charlm.num_train_steps = 10
    train_and_evaluate(tiny_charlm, str(workdir))
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    other = load_config("charlm", arg)
    if key:
        section, field = key.split(".")
        other[section][field] = value
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(other, str(workdir))
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert before == after


def test_finished_run_reports_and_free_fields_resume(tiny_charlm, tmp_path):
    workdir = str(tmp_path / "w")
    tiny_charlm.num_train_steps = 10
    first = train_and_evaluate(tiny_charlm, workdir)
    lines = logged(workdir, "val")
    again = train_and_evaluate(tiny_charlm, workdir)  # finished: evaluated, not retrained
    assert again["step"] == 10 and logged(workdir, "val") == lines
    for key in ("val_perplexity", "best_val_perplexity", "best_step"):
        assert again[key] == pytest.approx(first[key], rel=1e-6)
    assert again["train_perplexity"] == pytest.approx(first["train_perplexity"], rel=1e-6)
    assert 0.5 * first["train_time_s"] < again["train_time_s"] <= first["train_time_s"] + 0.5
    tiny_charlm.num_train_steps = 12
    tiny_charlm.model.dropout = 0.3  # regularisation and the schedule may change on resume
    assert train_and_evaluate(tiny_charlm, workdir)["step"] == 12


def test_best_checkpoint_survives_a_resume_that_does_not_beat_it(tiny_charlm, tmp_path):
    """A best checkpoint newer than the latest one stays the one to beat, even when the
    replayed steps differ (here: more dropout) and do not reach its loss."""
    workdir = str(tmp_path / "w")
    tiny_charlm.eval_every = 2
    tiny_charlm.checkpoint_every = 4
    train_and_evaluate(tiny_charlm, workdir, stop_after=6)
    ckpts = Checkpoints(workdir)
    ckpts.managers["latest"].delete(6)  # as if killed after the best save of step 6
    ckpts.close()
    val = {r["step"]: r["loss"] for r in logged(workdir, "val")}
    assert int(restored(workdir, "best")["step"]) == 6 and val[6] == min(val.values())
    tiny_charlm.model.dropout = 0.9
    tiny_charlm.num_train_steps = 8
    results = train_and_evaluate(tiny_charlm, workdir)
    replayed = {r["step"]: r["loss"] for r in logged(workdir, "val") if r["step"] > 4}
    assert min(replayed.values()) > val[6]  # the premise: the replay does not beat it
    assert int(restored(workdir, "best")["step"]) == results["best_step"] == 6
    assert results["best_val_loss"] == pytest.approx(val[6])


def test_sigterm_stops_a_sweep_after_saving(tmp_path):
    workdir = tmp_path / "sweep"
    first = "model.cell=rnn,opt.lr=0.002"
    out = _terminate_when_logged(workdir / first / "metrics.jsonl",
                                 "--workdir", str(workdir), "--sweep")
    assert "sweep stopped" in out and "=== sweep point model.cell=rnn,opt.lr=0.005" not in out
    with open(workdir / "summary.csv") as f:
        rows = {r["point"]: r for r in csv.DictReader(f)}
    assert len(rows) == 6 and rows[first]["status"] == "stopped"
    assert {r["status"] for p, r in rows.items() if p != first} == {"not run"}
    assert Checkpoints(str(workdir / first)).latest_step() == int(rows[first]["step"]) > 0


def test_sigkill_while_a_checkpoint_is_written_leaves_the_previous_one(tiny_charlm, tmp_path):
    """orbax writes a step into a temporary directory and renames it when complete: a run
    killed mid-write resumes from the last complete step, exactly."""
    settings = dict(num_train_steps=1000, checkpoint_every=1, log_every=1, eval_every=100000)
    tiny_charlm.update(settings)
    workdir, checkpoints = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    proc = _start_tiny_run("--workdir", str(workdir),
                           *(f"--config.{k}={v}" for k, v in settings.items()),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    writing = lambda names: any(not n.isdigit() and "tmp" in n for n in names)
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None and time.time() < deadline, "no checkpoint write was caught"
        names = os.listdir(checkpoints) if checkpoints.exists() else []
        if sum(n.isdigit() for n in names) >= 2 and writing(names):
            proc.send_signal(signal.SIGSTOP)  # frozen, unless orbax finished the write meanwhile
            if writing(os.listdir(checkpoints)):
                break
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    step = Checkpoints(str(workdir)).latest_step()
    assert step >= 2 and int(restored(str(workdir))["step"]) == step
    reference = tmp_path / "reference"
    train_and_evaluate(tiny_charlm, str(reference), stop_after=step + 3)
    results = train_and_evaluate(tiny_charlm, str(workdir), stop_after=3)
    assert results["step"] == step + 3
    for a, b in zip(jax.tree.leaves(restored(str(reference))),
                    jax.tree.leaves(restored(str(workdir)))):
        np.testing.assert_array_equal(a, b)


def test_export_npz_and_a_config_saved_before_a_field_was_added(tiny_charlm, tmp_path):
    import flax

    from seqjax.tasks import charlm
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_charlm, str(workdir))
    out = tmp_path / "params.npz"
    proc = launch("--config", "experiments/charlm.py:tiny", "--workdir", str(workdir),
                  "--mode", "export", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as archive:
        arrays = dict(archive)
    assert "rnn/layer_0/W_xi" in arrays and "rnn/layer_0/W_hi" in arrays  # textbook names
    params = {"params": flax.traverse_util.unflatten_dict(arrays, sep="/")}
    saved, task, checkpoint, _ = saved_runs.restore_run(str(workdir))
    vocab = json.loads((workdir / "vocab.json").read_text())["idx_to_token"]
    model = charlm.make_model(saved, len(vocab))
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % 20
    np.testing.assert_array_equal(model.apply(params, tokens)[0],
                                  model.apply(checkpoint, tokens)[0])

    # An older config.json without fields added since: eval and resume read their defaults.
    config_file = workdir / "config.json"
    old = json.loads(config_file.read_text())
    del old["parallel"], old["model"]["unroll"]
    config_file.write_text(json.dumps(old))
    assert saved_runs.evaluate(tiny_charlm, str(workdir))["step"] == tiny_charlm.num_train_steps
    tiny_charlm.num_train_steps += 2
    assert train_and_evaluate(tiny_charlm, str(workdir))["step"] == tiny_charlm.num_train_steps
