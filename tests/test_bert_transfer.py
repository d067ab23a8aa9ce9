"""What a curve of downstream accuracy against pretraining compute needs: a pretraining run that
keeps its checkpoints at chosen steps (`keep_steps`), fine-tuning from one of them
(`init_from_step`), a linear probe on a frozen encoder (`model.freeze_encoder`), and the sweep
and summary of experiments/bert_transfer.py."""

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest

from seqjax import sweep, tasks
from seqjax.analysis import transfer_curve
from seqjax.config import load_experiment
from seqjax.train import checkpoint, loop
from seqjax.train.loop import train_and_evaluate
from seqjax.train.metrics import METRICS_FILE, read_metrics

from conftest import ROOT, load_config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bert") / "pretrain"
    config = load_config("bert_pretrain", "smoke")
    config.num_train_steps, config.checkpoint_every, config.keep_checkpoints = 6, 3, 1
    config.keep_steps = (2, 4)
    train_and_evaluate(config, str(workdir))
    return workdir


def _finetune(pretrained, workdir, **changes):
    config = load_config("bert_finetune", "smoke")
    config.unlock()
    config.init_from = str(pretrained)
    for key, value in changes.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    train_and_evaluate(config, str(workdir))
    return checkpoint.restore_saved(str(workdir))[1]["params"]["params"]


def test_keep_steps_keep_those_checkpoints_beside_the_latest(pretrained):
    ckpts = checkpoint.Checkpoints(str(pretrained), 1)
    try:
        assert sorted(ckpts.managers["latest"].all_steps()) == [2, 4, 6]
    finally:
        ckpts.close()


def test_fine_tuning_from_a_chosen_step(pretrained, tmp_path):
    at_2 = checkpoint.restore_saved(str(pretrained), 2)[1]["params"]["params"]
    at_6 = checkpoint.restore_saved(str(pretrained))[1]["params"]["params"]
    assert not np.array_equal(at_2["encoder"]["token_embed"]["embedding"],
                              at_6["encoder"]["token_embed"]["embedding"])
    tuned = _finetune(pretrained, tmp_path / "from_2", init_from_step=2, num_train_steps=1,
                      **{"opt.lr": 1e-12})  # one step that barely moves anything
    np.testing.assert_allclose(tuned["encoder"]["token_embed"]["embedding"],
                               at_2["encoder"]["token_embed"]["embedding"], atol=1e-9)
    # Step 0: the pretraining run's tokenizer and an untrained encoder, none of its arrays.
    config = load_config("bert_finetune", "smoke")
    config.unlock()
    config.init_from, config.init_from_step = str(pretrained), 0
    task = tasks.build(config)
    host, loaded = loop._fresh_state(config, str(tmp_path / "from_0"), task, optax.sgd(0.1))
    assert loaded == []
    jax.tree.map(np.testing.assert_array_equal, host["params"],
                 jax.device_get(loop.fresh_params(config, task)))
    with pytest.raises(FileNotFoundError, match=r"no latest checkpoint at step 5 .* \[2, 4, 6\]"):
        _finetune(pretrained, tmp_path / "missing", init_from_step=5)


def test_a_frozen_encoder_is_a_linear_probe(pretrained, tmp_path):
    """With model.freeze_encoder the encoder and pooler end as loaded (no update, no weight
    decay), and only the classifier learns."""
    loaded = checkpoint.restore_saved(str(pretrained), 4)[1]["params"]["params"]
    tuned = _finetune(pretrained, tmp_path / "probe", init_from_step=4,
                      **{"model.freeze_encoder": True})
    for name in ("encoder", "pooler"):
        jax.tree.map(np.testing.assert_array_equal, tuned[name], loaded[name])
    free = _finetune(pretrained, tmp_path / "tuned", init_from_step=4)
    assert not np.array_equal(free["encoder"]["embed_ln"]["scale"],
                              loaded["encoder"]["embed_ln"]["scale"])


def test_the_probe_trains_on_features_computed_once_as_it_would_on_tokens(
        pretrained, tmp_path, monkeypatch):
    """A frozen encoder's pooled output is computed once (`Task.featurize`); the probe that
    trains on it ends where the same probe running the encoder every step ends."""
    probe = dict(init_from_step=4, **{"model.freeze_encoder": True, "opt.lr": 0.1})
    config = load_config("bert_finetune", "smoke")
    config.unlock()
    config.init_from, config.init_from_step, config.model.freeze_encoder = str(pretrained), 4, True
    task = tasks.build(config)
    params = loop.fresh_params(config, task)
    featurized = task.featurize(task, params)
    assert featurized.featurize is None
    assert sorted(featurized.train_batch(3)) == ["labels", "pooled"]
    assert featurized.train_batch(3)["pooled"].shape == (8, config.model.d_model)
    np.testing.assert_array_equal(featurized.train_batch(3)["labels"],
                                  task.train_batch(3)["labels"])

    on_features = _finetune(pretrained, tmp_path / "features", **probe)
    build = tasks.build
    monkeypatch.setattr(tasks, "build", lambda *args, **kw: dataclasses.replace(
        build(*args, **kw), featurize=None))
    on_tokens = _finetune(pretrained, tmp_path / "tokens", **probe)
    assert not np.allclose(on_tokens["classifier"]["kernel"],
                           jax.device_get(params)["params"]["classifier"]["kernel"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 on_features, on_tokens)
    val = [[r["loss"] for r in read_metrics(str(tmp_path / run), "val")]
           for run in ("features", "tokens")]
    np.testing.assert_allclose(val[0], val[1], rtol=1e-5)


def test_the_transfer_sweep_at_smoke_size(pretrained, tmp_path):
    """experiments/bert_transfer.py's points (two pretraining steps, both regimes, two seeds)
    train from the pretraining run, and its summary has one row per arm."""
    experiment = load_experiment(str(ROOT / "experiments" / "bert_transfer.py"))
    config = experiment.get_config("smoke")
    config.unlock()
    config.init_from = str(pretrained)
    points = experiment.points(steps=(0, 4), labels=(16,), seeds=(0, 1),
                               learning_rates={"fine-tune": (1e-3,), "probe": (1e-2,)})
    assert not sweep.run(config, points, str(tmp_path))
    rows = sweep.summarize(points, str(tmp_path))
    assert [row["status"] for row in rows] == ["ok"] * 8
    assert experiment.summarize_sweep(rows, str(tmp_path)) == "transfer.md"
    by_step, arms = (part.splitlines()[2:] for part in
                     (tmp_path / "transfer.md").read_text().split("\n\n"))
    assert [line.split(" | ")[:2] for line in by_step] == [["| fine-tune", "16"],
                                                          ["| probe", "16"]]
    assert [line.split(" | ")[:3] for line in arms] == [
        ["| 0", "fine-tune", "16"], ["| 0", "probe", "16"], ["| 4", "fine-tune", "16"],
        ["| 4", "probe", "16"]]
    assert (tmp_path / "transfer.png").stat().st_size > 0


def test_each_arm_takes_the_learning_rate_with_the_best_mean_over_seeds(tmp_path):
    """The aggregation on made-up metrics: accuracy at the lowest validation loss of each
    point, the best mean over seeds per arm, the sample standard deviation as the spread."""
    val = {  # (step, lr, seed) -> [(loss, accuracy) of each evaluation]
        (0, 0.1, 0): [(0.7, 0.50), (0.6, 0.60)], (0, 0.1, 1): [(0.6, 0.70), (0.65, 0.9)],
        (0, 0.2, 0): [(0.5, 0.55)], (0, 0.2, 1): [(0.5, 0.55)],
        (9, 0.1, 0): [(0.4, 0.80)], (9, 0.1, 1): [(0.4, 0.90)]}
    rows = []
    for (step, lr, seed), evaluations in val.items():
        name = f"{step}-{lr}-{seed}"
        (tmp_path / name).mkdir()
        (tmp_path / name / METRICS_FILE).write_text("".join(
            json.dumps({"split": "val", "step": 10 * (i + 1), "loss": loss, "accuracy": acc})
            + "\n" for i, (loss, acc) in enumerate(evaluations)))
        rows.append({"point": name, "status": "ok", transfer_curve.STEP: step,
                     transfer_curve.FROZEN: False, transfer_curve.LABELS: 100,
                     transfer_curve.LR: lr})
    table = transfer_curve.write(rows, str(tmp_path))
    # lr 0.1 at step 0: 0.60 and 0.70 (mean 0.65) beats lr 0.2's 0.55 and 0.55.
    assert [(a["pretraining_step"], a["lr"]) for a in table] == [(0, 0.1), (9, 0.1)]
    np.testing.assert_allclose([a["accuracy"] for a in table], [0.65, 0.85])
    np.testing.assert_allclose([a["spread"] for a in table], [np.std([0.6, 0.7], ddof=1),
                                                             np.std([0.8, 0.9], ddof=1)])
    np.testing.assert_allclose([a["gain"] for a in table], [0.0, 0.2])
    # a gain of 0.2: at least 0.03, and more than twice the larger spread (2 x 0.0707)
    assert [a["pays"] for a in table] == ["", "yes"]
    assert (tmp_path / "transfer.md").read_text().splitlines()[:3] == [
        "| regime | labels | step 0 | step 9 |", "|---|---|---|---|",
        "| fine-tune | 100 | 0.650 ± 0.071 | **0.850 ± 0.071** |"]
