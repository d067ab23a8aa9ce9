"""Sweeps through launch.py: every point in its own sub-workdir, one after another or as parallel
worker processes; a failed point is recorded and the others go on; a rerun skips finished
points; the summary (CSV, markdown, PNG) lists every point."""

import csv

import ml_collections
import pytest

from seqjax import sweep

from conftest import ROOT, launch

TINY = ("--config.num_train_steps=4", "--config.eval_every=2", "--config.sample.length=5")


def _experiment(path, points: str):
    """An experiment file: the char LM's configs with the sweep `points` (Python source)."""
    charlm = str(ROOT / "experiments" / "charlm.py")
    path.write_text(
        "from seqjax.config import load_experiment\n"
        f"get_config = load_experiment({charlm!r}).get_config\n"
        f"get_sweep = lambda: {points}\n")
    return path


def _rows(workdir):
    with open(workdir / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_product_and_point_checks():
    assert sweep.product({"a": (1, 2), "b.c": ("x", "y")}) == [
        {"a": 1, "b.c": "x"}, {"a": 1, "b.c": "y"}, {"a": 2, "b.c": "x"}, {"a": 2, "b.c": "y"}]
    assert sweep.point_name({"model.cell": "gru", "opt.lr": 0.001}) == "model.cell=gru,opt.lr=0.001"
    with pytest.raises(ValueError, match="non-empty list"):
        sweep.product({"a": ()})
    config = ml_collections.ConfigDict({"opt": {"lr": 0.1}, "cell": "rnn"})
    config.lock()
    assert sweep.apply(config, {"opt.lr": 0.5}).opt.lr == 0.5 and config.opt.lr == 0.1
    with pytest.raises(ValueError, match="no field 'opt.lrr'"):
        sweep.check_points([{"opt.lrr": 0.5}], config)
    with pytest.raises(ValueError, match="no field 'cell.x'"):
        sweep.check_points([{"cell.x": 1}], config)
    with pytest.raises(TypeError, match="opt.lr='fast'"):
        sweep.check_points([{"opt.lr": "fast"}], config)
    with pytest.raises(ValueError, match="repeats a point"):
        sweep.check_points([{"opt.lr": 0.5}, {"opt.lr": 0.5}], config)
    with pytest.raises(ValueError, match="non-empty list"):
        sweep.check_points([], config)


def test_shipped_sweep_summarises_and_a_rerun_skips_finished_points(tmp_path):
    workdir = tmp_path / "sweep"
    args = ("--config", "experiments/charlm.py:tiny", "--workdir", str(workdir), "--sweep", *TINY)
    run = launch(*args, timeout=600)
    assert run.returncode == 0, run.stderr
    rows = _rows(workdir)
    shipped = [f"model.cell={cell},opt.lr={lr}"
               for cell in ("rnn", "gru", "lstm") for lr in (0.002, 0.005)]
    assert sorted(r["point"] for r in rows) == sorted(shipped)
    assert all(r["status"] == "ok" and r["step"] == "4" for r in rows)
    best = [float(r["best_val_loss"]) for r in rows]
    assert best == sorted(best)
    table = (workdir / "summary.md").read_text()
    assert table in run.stdout and table.count("\n") == 2 + len(rows)
    assert (workdir / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = launch(*args, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished, skipped") == len(shipped)

    # --mode summarize rewrites the summary, here sorted by another metric.
    (workdir / "summary.csv").unlink()
    summary = launch(*args[:4], "--mode", "summarize", "--metric", "val_perplexity")
    assert summary.returncode == 0, summary.stderr
    perplexities = [float(r["val_perplexity"]) for r in _rows(workdir)]
    assert len(perplexities) == len(shipped) and perplexities == sorted(perplexities)


def test_a_failed_point_does_not_stop_the_others_in_parallel(tmp_path):
    experiment = _experiment(tmp_path / "failing.py",
                             "[{'opt.lr': 0.002}, {'opt.lr': -1.0}, {'model.cell': 'gru'}]")
    workdir = tmp_path / "sweep"
    args = ("--config", f"{experiment}:tiny", "--workdir", str(workdir), "--sweep", *TINY,
            "--parallel", "2")
    run = launch(*args, timeout=600)
    assert run.returncode == 1  # a point failed
    rows = {r["point"]: r for r in _rows(workdir)}
    assert set(rows) == {"opt.lr=0.002", "opt.lr=-1.0", "model.cell=gru"}
    assert rows["opt.lr=-1.0"]["status"].startswith("failed: ValueError: config.opt.lr=-1.0")
    assert rows["opt.lr=0.002"]["status"] == rows["model.cell=gru"]["status"] == "ok"
    assert "must be a finite number >= 0" in (workdir / "opt.lr=-1.0" / "log.txt").read_text()
    assert list(rows)[-1] == "opt.lr=-1.0"  # sorted by best_val_loss; the failure has none

    again = launch(*args, timeout=600)  # finished points are skipped, the failed one retried
    assert again.returncode == 1
    assert again.stdout.count("finished, skipped") == 2
    assert "=== sweep point opt.lr=-1.0: started" in again.stdout


def test_a_bad_sweep_definition_fails_before_anything_runs(tmp_path):
    experiment = _experiment(tmp_path / "bad.py", "[{'opt.lr': 0.002}, {'model.cel': 'gru'}]")
    run = launch("--config", f"{experiment}:tiny", "--workdir", str(tmp_path / "sweep"), "--sweep")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == \
        "error: sweep point model.cel=gru: the config has no field 'model.cel'"
    assert not (tmp_path / "sweep").exists()
