"""What every task shares: the `Task` interface the engine sees, the dtype names of configs, the
Transformer hyperparameters of a config, and the sums that losses report.

A loss is a module-level pure function `loss(model, params, batch, carry, *, rng, train, ...)`
that runs per device and returns `(sums, carry)`: `sums` maps metric names to sums over the
device's batch, with the denominator under 'weight'; the engine sums them across devices and
divides on the host. A task binds its model (and options) with `functools.partial`.
"""

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import optax

from seqjax import config as config_lib
from seqjax import files
from seqjax.nn.compute import REMAT
from seqjax.nn.transformer_config import TransformerConfig

# float16 is refused: its 5-bit exponent underflows small gradients unless the loss is scaled
# (dynamic loss scaling), which seqjax does not do; bfloat16 has float32's range.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Task:
    """What the engine needs from a task.

    `loss(params, batch, carry, *, rng, train) -> (sums, carry)` (see the module docstring);
    `carry` is state that flows from one batch to the next (an RNN's hidden state over a token
    stream), or ().
    """

    init_params: Callable[[Any], Any]  # rng -> params
    loss: Callable
    # step -> this process's rows of the global batch, as host (NumPy) arrays; the engine calls
    # it from a background thread, ahead of the step, so it must be a pure function of the step
    train_batch: Callable[[int], dict]
    eval_batches: Sequence[dict]
    batch_size: int  # global, training
    eval_batch_size: int  # global
    tokens_per_batch: int
    init_carry: Callable[[int], Any] = lambda batch_size: ()  # host arrays, batch axis first
    report: Callable[[dict], dict] = lambda means: means  # adds derived metrics (perplexity, ...)
    # metric -> the sum it is a mean over, where that is not 'weight' (per sequence, say)
    denominators: dict = dataclasses.field(default_factory=dict)
    files: dict = dataclasses.field(default_factory=dict)  # name -> text, saved in the workdir
    generate: Callable | None = None  # (params, rng, **options) -> str
    translate_sentences: Callable | None = None  # (params, sentences, **options) -> list[str]
    # (params, final) -> metrics from a search on the host (BLEU), added to each validation;
    # with final (the end of training, and eval) also test metrics and files in the workdir
    decode_eval: Callable | None = None
    frozen: tuple = ()  # top-level parameter modules the optimizer leaves as they are
    # (task, params) -> `task` on the outputs of its frozen modules, computed once from
    # `params` (a linear probe's pooled features): the same losses, without running them each step
    featurize: Callable | None = None


def saved_file(workdir: str | None, name: str) -> str | None:
    """The text of a file a run saved in its workdir (`Task.files`: a vocabulary, a tokenizer),
    or None: a task rebuilt from a workdir reads text the way its checkpoints were trained."""
    path = workdir and os.path.join(workdir, name)
    if not (path and files.exists(path)):
        return None
    return files.read_text(path)


def check_precision(config):
    """model.dtype (computation), model.param_dtype (parameters) and model.remat."""
    for key in ("model.dtype", "model.param_dtype"):
        value = config_lib.get(config, key)
        hint = (": float16 needs loss scaling, which seqjax does not do; bfloat16 has "
                "float32's range") if value == "float16" else ""
        config_lib.expect(value in DTYPES, key, value, f"expected one of {sorted(DTYPES)}{hint}")
    config_lib.expect(config_lib.get(config, "model.remat") in REMAT, "model.remat",
                      config_lib.get(config, "model.remat"), f"expected one of {REMAT}")


def precision(config) -> dict:
    """The dtype, param_dtype and remat of `config.model` as module keyword arguments."""
    m = config.model
    return dict(dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], remat=m.remat)


def transformer_config(config, *, max_length_key: str, **fixed) -> TransformerConfig:
    """The checked `TransformerConfig` of `config.model`; its length limit is the config value
    at `max_length_key`, and errors name config keys."""
    check_precision(config)
    m = config.model
    keys = {"dropout_rate": "model.dropout", "attention_dropout_rate": "model.attention_dropout",
            "max_length": max_length_key}
    values = {f.name: config_lib.get(config, keys.get(f.name, f"model.{f.name}"))
              for f in dataclasses.fields(TransformerConfig)
              if f.name not in fixed and f.name not in ("dtype", "param_dtype")}
    return TransformerConfig(**values, **fixed, dtype=DTYPES[m.dtype],
                             param_dtype=DTYPES[m.param_dtype]).check(
        name=lambda field: keys.get(field, f"model.{field}"), expect=config_lib.expect)


def check_training_rows(config) -> bool:
    """data.pack and data.shard_dir (the tasks that pack and stream their training rows);
    returns whether rows are packed."""
    pack = config_lib.expect_type(config, "data.pack", bool)
    if pack:
        config_lib.expect(config.model.attention_impl != "cudnn", "model.attention_impl",
                          config.model.attention_impl,
                          "takes no segment ids (jax.nn.dot_product_attention's cuDNN path): "
                          "with data.pack=True use 'auto', 'seqjax' or 'xla'")
    if config.data.get("shard_dir") is not None:
        config_lib.expect_type(config, "data.shard_dir", str)
    return pack


def pack_align(config) -> int:
    """Where packed sequences may start: at every position, or with block-local attention at
    block boundaries, so that a sequence sees the same windows packed as alone."""
    m = config.model
    return m.block_size if m.attention == "local" else 1


def lm_sums(logits_BxTxV, targets_BxT, weights_BxT=None) -> dict:
    """Summed next-token cross-entropy and its weight (padding has weight 0 in eval batches)."""
    ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
    weights_BxT = jnp.ones_like(ce_BxT) if weights_BxT is None else weights_BxT
    return {"loss": jnp.sum(ce_BxT * weights_BxT), "weight": jnp.sum(weights_BxT)}


def accuracy_sum(logits, labels, weights):
    return jnp.sum((jnp.argmax(logits, -1) == labels) * weights)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def with_perplexity(means: dict) -> dict:
    return dict(means, perplexity=perplexity(means["loss"]))
