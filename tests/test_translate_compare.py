"""experiments/translate_compare.py at tiny size: the three models train as sweep points, and the
summary picks each model's best learning rate by validation BLEU within the budget and plots
BLEU against time, a longer run beyond it."""

from seqjax import config as config_lib
from seqjax import sweep
from seqjax.analysis import translation_compare
from seqjax.config import load_experiment

from conftest import ROOT


def test_the_equal_budget_comparison_at_tiny_size(tmp_path):
    experiment = load_experiment(str(ROOT / "experiments" / "translate_compare.py"))
    config = experiment.get_config("tiny")
    models = {label: (what, budget, rates[:1]) for label, (what, budget, rates)
              in experiment.MODELS.items()}
    points = experiment.points(models, steps=4, longer=experiment.LONGER[:1])
    full = experiment.get_sweep()
    assert [p["opt.lr"] for p in full[:3]] == [rates[1] for _, _, rates in
                                               experiment.MODELS.values()]
    longer = len(experiment.LONGER)
    assert full[-longer:] == [{**experiment.MODELS[label][0], "opt.lr": lr, "num_train_steps":
                               experiment.MODELS[label][1] * times}
                              for label, times, lr in experiment.LONGER]
    assert sorted((p["model.name"], p.get("model.bidirectional"), p["opt.lr"])
                  for p in full[:-longer]) == \
        sorted((what["model.name"], what.get("model.bidirectional"), lr)
               for what, _, rates in experiment.MODELS.values() for lr in rates)
    assert not sweep.run(config, points, str(tmp_path))
    rows = sweep.summarize(points, str(tmp_path))
    assert [row["status"] for row in rows] == ["ok"] * 4
    assert experiment.summarize_sweep(rows, str(tmp_path)) == "compare.md"
    curves = {row["point"]: translation_compare.curve(str(tmp_path / row["point"]))
              for row in rows}
    table = translation_compare.table(rows, {k: v[0] for k, v in experiment.MODELS.items()},
                                      curves)
    label, times, _ = experiment.LONGER[0]
    assert sorted((r["model"], r["budget"], r["best"], r["steps"]) for r in table) == sorted(
        [(label, 1, "yes", 4) for label in experiment.MODELS] + [(label, times, "", 4 * times)])
    assert all(0 <= r["test_bleu_greedy"] <= 100 and 0 <= r["test_alignment"] <= 1
               for r in table)
    for row in table:  # an evaluation every 2 steps, each with the time spent so far
        line = curves[row["point"]]
        assert [step for step, _, _ in line] == list(range(2, row["steps"] + 1, 2))
        assert 0 < line[0][1] < line[1][1] and line[-1][1] == row["train_min"]
    assert (tmp_path / "compare.md").read_text().count("| yes |") == 3
    assert f"| {times}x |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_the_best_point_is_the_highest_final_validation_bleu_within_the_budget():
    rows = [dict(point=f"p{i}", status="ok", step=steps, **{
        "model.name": "transformer", "num_train_steps": steps, "opt.lr": lr, "val_bleu": bleu})
            for i, (steps, lr, bleu) in enumerate([(10, 1e-3, 12.0), (10, 2e-3, 15.5),
                                                   (10, 4e-3, 3.0), (30, 2e-3, 20.0)])]
    rows.append(dict(point="p4", status="failed: x", **{"model.name": "transformer",
                                                        "num_train_steps": 10, "opt.lr": 8e-3}))
    table = translation_compare.table(rows, {"transformer": {"model.name": "transformer"}}, {})
    assert [(r["point"], r["budget"], r["best"]) for r in table] == [
        ("p0", 1, ""), ("p1", 1, "yes"), ("p2", 1, ""), ("p4", 1, ""), ("p3", 3, "")]


def test_the_default_recurrent_run_is_the_sweeps_best_gru_point():
    """The README quotes that point's results for translate.py:model=seq2seq_attention."""
    translate = load_experiment(str(ROOT / "experiments" / "translate.py"))
    compare = load_experiment(str(ROOT / "experiments" / "translate_compare.py"))
    default = translate.get_config("model=seq2seq_attention")
    gru, _, rates = compare.MODELS["gru"]
    assert default.opt.lr in rates
    point = {**gru, "num_train_steps": default.num_train_steps, "opt.lr": default.opt.lr}
    assert point in compare.get_sweep()
    swept = sweep.apply(compare.get_config(), point)
    assert [d.split(":")[0] for d in config_lib.differences(
        config_lib.flatten(swept), config_lib.flatten(default))] == ["keep_checkpoints"]
