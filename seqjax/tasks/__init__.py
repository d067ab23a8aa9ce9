"""Tasks: each builds the data, model, loss and metrics of one experiment family.

`build(config, workdir)` returns a `Task`, the only thing the engine knows about a task.
"""

import dataclasses
import os
from typing import Any, Callable, Iterable


@dataclasses.dataclass(frozen=True)
class Task:
    """What the engine needs from a task.

    `loss(params, batch, carry, rng, train) -> (sums, carry)` is pure and runs per device:
    `sums` maps metric names to sums over the device's batch, with the denominator under
    'weight'; the engine sums them across devices and divides on the host. `carry` is state
    that flows from one batch to the next (an RNN's hidden state over a token stream), or ().
    """

    init_params: Callable[[Any], Any]  # rng -> params
    init_carry: Callable[[int], Any]  # batch size -> carry (host arrays with a leading batch axis)
    loss: Callable
    train_batch: Callable[[int], dict]  # step -> this process's rows of the global batch
    eval_batches: Callable[[], Iterable[dict]]
    batch_size: int  # global, training
    eval_batch_size: int  # global
    tokens_per_batch: int
    report: Callable[[dict], dict] = lambda means: means  # adds derived metrics (perplexity, ...)
    # metric -> the sum it is a mean over, where that is not 'weight' (per sequence, say)
    denominators: dict = dataclasses.field(default_factory=dict)
    files: dict = dataclasses.field(default_factory=dict)  # name -> text, saved in the workdir
    generate: Callable | None = None  # (params, rng, **options) -> str
    translate: Callable | None = None  # (params, sentences, **options) -> list[str]
    # (params, final) -> metrics from a search on the host (BLEU), added to each validation;
    # with final (the end of training, and eval) also test metrics and files in the workdir
    decode_eval: Callable | None = None


def saved_file(workdir: str | None, name: str) -> str | None:
    """The text of a file a run saved in its workdir (`Task.files`: a vocabulary, a tokenizer),
    or None: a task rebuilt from a workdir reads text the way its checkpoints were trained."""
    path = workdir and os.path.join(workdir, name)
    if not (path and os.path.exists(path)):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def build(config, workdir: str | None = None) -> Task:
    from seqjax.tasks import bert, charlm, charlm_transformer, translate
    builders = {"charlm": charlm.build, "charlm_transformer": charlm_transformer.build,
                "translate": translate.build, "bert_pretrain": bert.build_pretrain,
                "bert_finetune": bert.build_finetune}
    if config.task not in builders:
        raise ValueError(f"config.task={config.task!r}: expected one of {sorted(builders)}")
    return builders[config.task](config, workdir)
