"""Validation metrics of parameters on the devices: the means of a task's loss sums over its
evaluation batches, and the metrics of its search on the host (`Task.decode_eval`: BLEU)."""

import functools

import jax
from jax.sharding import PartitionSpec as P

from seqjax.train import parallel
from seqjax.train.metrics import means
from seqjax.train.step import AXIS, eval_step


def make_evaluator(task, par):
    """A function (params replicated on the devices, *, final) -> validation metrics; with
    `final` (the end of training, and eval) the task's search adds its test metrics."""
    p_eval = par.compile(functools.partial(eval_step, loss_fn=task.loss),
                         (P(), P(AXIS), parallel.BATCH), (P(), P(AXIS)))

    def loss_metrics(params) -> dict:
        carry = par.batch(task.init_carry(task.eval_batch_size // jax.process_count()))
        total = {}
        for batch in task.eval_batches:
            sums, carry = p_eval(params, carry, par.batch(parallel.local_rows(batch)))
            # Read back before the next batch is dispatched (with every batch in flight XLA:CPU's
            # collectives could deadlock), and summed on the host (not one more global program).
            for k, v in par.unreplicate(sums).items():
                total[k] = total.get(k, 0.0) + float(v)
        return means(total, task.denominators)

    def validation_metrics(params, *, final: bool) -> dict:
        metrics = task.report(loss_metrics(params))
        if task.decode_eval is not None:
            metrics.update(task.decode_eval(par.unreplicate(params), final))
        return metrics

    return validation_metrics
