r"""The step budgets of experiments/translate_compare.py: what a training step and an
evaluation cost for each of its models, and how many steps fit its 25-minute budget.

    python benchmarks/translate_budget.py               # the compared models
    python benchmarks/translate_budget.py --smoke       # the tiny config, 2 short rounds

Each model's task is built from translate_compare.py's config with the model's overrides. A
round times, for every model in turn, `--steps` of the engine's own training step
(`common.EngineTrainer`: compiled as the loop compiles it, on the task's first 8 batches) and
one evaluation as the loop runs it (`seqjax.train.evaluation.make_evaluator`: validation loss
and greedy BLEU on `decode.val_sentences` pairs), so that a change of load on a shared machine
hits all models alike. Cost per step = median step time + median evaluation time /
`eval_every`; steps in the budget = budget / cost per step, beside translate_compare.py's
`MODELS` steps and the ratio of each model's cost to the Transformer's (paired over rounds).
"""

import os
import statistics
import time

from absl import app, flags

from seqjax import config as config_lib
from seqjax import tasks
from seqjax.config import load_experiment
from seqjax.train.evaluation import make_evaluator

from common import EngineTrainer, environment, load_average, paired_median

flags.DEFINE_bool("smoke", False, "the tiny config and 2 short rounds (a test)")
flags.DEFINE_integer("steps", 10, "training steps a round")
flags.DEFINE_integer("repeats", 5, "timed rounds")
flags.DEFINE_float("budget_minutes", 25.0, "the budget each model's steps must fit")
FLAGS = flags.FLAGS
ROOT = os.path.join(os.path.dirname(__file__), "..")


def main(_):
    experiment = load_experiment(os.path.join(ROOT, "experiments", "translate_compare.py"))
    steps, repeats = (2, 2) if FLAGS.smoke else (FLAGS.steps, FLAGS.repeats)
    print(environment(extras=[load_average()]))
    rounds = {}
    for label, (what, budget, _) in experiment.MODELS.items():
        config = config_lib.override(experiment.get_config("tiny" if FLAGS.smoke else None),
                                     what, label)
        task = tasks.build(config)
        trainer = EngineTrainer(task, config)
        evaluate = make_evaluator(task, trainer.par)
        trainer(1)  # compiles
        evaluate(trainer.params(), final=False)
        rounds[label] = dict(trainer=trainer, evaluate=evaluate, budget=budget,
                             eval_every=config.eval_every, step_s=[], eval_s=[])
    for _ in range(repeats):
        for r in rounds.values():
            start = time.perf_counter()
            r["trainer"](steps)
            middle = time.perf_counter()
            r["evaluate"](r["trainer"].params(), final=False)
            r["step_s"].append((middle - start) / steps)
            r["eval_s"].append(time.perf_counter() - middle)
    costs = {label: [s + e / r["eval_every"] for s, e in zip(r["step_s"], r["eval_s"])]
             for label, r in rounds.items()}
    base_cost = next(iter(costs.values()))
    print(f"{'model':12} {'step s':>8} {'eval s':>8} {'cost/step':>10} {'vs first':>9} "
          f"{'steps in budget':>16} {'MODELS steps':>13}")
    for label, r in rounds.items():
        cost = costs[label]
        median = statistics.median(cost)
        print(f"{label:12} {statistics.median(r['step_s']):8.3f} "
              f"{statistics.median(r['eval_s']):8.2f} {median:10.3f} "
              f"{paired_median(cost, base_cost):9.2f} "
              f"{FLAGS.budget_minutes * 60 / median:16.0f} {r['budget']:13d}")


if __name__ == "__main__":
    app.run(main)
