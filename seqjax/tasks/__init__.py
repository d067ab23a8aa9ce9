"""Tasks: each builds the data, model, loss and metrics of one experiment family.

`build(config, workdir)` returns a `Task` (`seqjax.tasks.common`), the only thing the engine
knows about a task.
"""

from seqjax.tasks.common import Task


def build(config, workdir: str | None = None) -> Task:
    from seqjax.tasks import bert, charlm, charlm_transformer, translation
    builders = {"charlm": charlm.build, "charlm_transformer": charlm_transformer.build,
                "translate": translation.build, "bert_pretrain": bert.build_pretrain,
                "bert_finetune": bert.build_finetune}
    if config.task not in builders:
        raise ValueError(f"config.task={config.task!r}: expected one of {sorted(builders)}")
    return builders[config.task](config, workdir)
