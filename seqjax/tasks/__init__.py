"""Tasks: each builds the data, model, loss and metrics of one experiment family.

`build(config, workdir)` returns a `Task` (`seqjax.tasks.common`), the only thing the engine
knows about a task.
"""

from seqjax.tasks.common import Task


def build(config, workdir: str | None = None) -> Task:
    from seqjax.tasks import bert, bert_finetune, charlm, charlm_transformer, translation
    builders = {"charlm": charlm.build, "charlm_transformer": charlm_transformer.build,
                "translate": translation.build, "bert_pretrain": bert.build_pretrain,
                "bert_finetune": bert_finetune.build_finetune}
    if config.task not in builders:
        raise ValueError(f"config.task={config.task!r}: expected one of {sorted(builders)}")
    return builders[config.task](config, workdir)


def prepare(config, workdir: str | None, sources: list[str], out_dir: str) -> dict:
    """Writes the training rows of text files `sources` of any size into shards in `out_dir`
    with the tokenizers of the run in `workdir` (`seqjax.tasks.shards`); returns the manifest."""
    from seqjax.tasks import bert, shards, translation
    preparers = {"bert_pretrain": bert.prepare_rows, "translate": translation.prepare_rows}
    if config.task not in preparers:
        raise ValueError(f"config.task={config.task!r}: --mode prepare writes the training "
                         f"corpus of {' or '.join(sorted(preparers))}")
    if not sources:
        raise ValueError("--source: give the text files to prepare (comma-separated)")
    tokenizers, rows = preparers[config.task](config, workdir, sources)
    return shards.prepare(config, tokenizers, rows, out_dir)
