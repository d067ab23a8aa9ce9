"""Early stopping on the tiny char LM: patience, a target metric, a finished run that stays
finished, and config errors. (A preemption on one of two processes: test_multihost.py.)"""

import pytest

from seqjax import sweep
from seqjax.train.checkpoint import Checkpoints
from seqjax.train.loop import train_and_evaluate

from conftest import logged


def _steps(workdir):
    ckpts = Checkpoints(str(workdir))
    try:
        return ckpts.latest_step(), ckpts.latest_step("best")
    finally:
        ckpts.close()


def test_patience_ends_the_run_with_its_best_checkpoint(tmp_path, tiny_charlm):
    # At lr 1e-12 no parameter changes (an update is far below a float32 ulp of the weights),
    # so the validation loss never improves on the first evaluation's.
    config = tiny_charlm
    config.opt.lr, config.eval_every, config.log_every = 1e-12, 2, 1
    config.early_stopping.patience = 2
    workdir = tmp_path / "patience"
    results = train_and_evaluate(config, str(workdir))
    assert results["step"] == 6 and "early_stopping.patience=2" in results["early_stopped"]
    assert results["best_step"] == 2 and "val_loss" in results
    (stop,) = logged(workdir, "early_stop")
    assert (stop["step"], stop["best_step"], stop["evaluations_since_best"]) == (6, 2, 2)
    assert [r["step"] for r in logged(workdir, "val")] == [2, 4, 6]
    assert logged(workdir)[-1]["step"] == 6
    assert _steps(workdir) == (6, 2)

    again = train_and_evaluate(config, str(workdir))  # finished: evaluated, not trained
    assert again["step"] == 6 and again["early_stopped"] == results["early_stopped"]
    assert logged(workdir)[-1]["step"] == 6

    config.early_stopping.patience = 0  # a config that would not have stopped it trains on
    assert train_and_evaluate(config, str(workdir))["step"] == config.num_train_steps


def test_target_metric_ends_the_run_when_reached(tmp_path, tiny_charlm):
    tiny_charlm.early_stopping.target = "perplexity<=1e9"
    results = train_and_evaluate(tiny_charlm, str(tmp_path / "target"))
    assert results["step"] == tiny_charlm.eval_every
    assert results["early_stopped"].startswith("validation perplexity ")
    tiny_charlm.early_stopping.target = "perplexity<=1"
    assert "early_stopped" not in train_and_evaluate(tiny_charlm, str(tmp_path / "not"))


@pytest.mark.parametrize("key, value, match", [
    ("patience", -1, "must be >= 0"),
    ("target", "accuracy > 0.5", "metric>=value"),
    ("target", "accuracy>=high", "metric>=value"),
    ("target", "accuracy>=1.2.3", "metric>=value"),
])
def test_bad_early_stopping_is_refused_before_anything_is_written(tmp_path, tiny_charlm, key,
                                                                  value, match):
    tiny_charlm.early_stopping[key] = value
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(tiny_charlm, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_a_target_metric_the_validation_does_not_report_names_those_it_does(tmp_path,
                                                                           tiny_charlm):
    tiny_charlm.early_stopping.target = "bleu>=20"
    with pytest.raises(ValueError, match=r"reports \['loss', 'perplexity'\], not 'bleu'"):
        train_and_evaluate(tiny_charlm, str(tmp_path / "bleu"))


def test_the_sweep_summary_says_which_points_stopped_early(tmp_path, tiny_charlm):
    points = [{"early_stopping.target": "perplexity<=1e9"}, {"early_stopping.target": ""}]
    workdir = tmp_path / "sweep"
    assert not sweep.run(tiny_charlm, points, str(workdir))
    rows = {row["point"]: row for row in sweep.summarize(points, str(workdir))}
    assert rows["early_stopping.target=perplexity<=1e9"]["early_stopped"].startswith(
        "validation perplexity")
    assert "early_stopped" not in rows["early_stopping.target="]
    header = (workdir / "summary.md").read_text().splitlines()[0]
    assert "early_stopped" in header
