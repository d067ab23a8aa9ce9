"""BERT fine-tuning: the encoder of a pretraining run (`config.init_from`), or the same model from
scratch, as a sentence classifier on SST-2 (or GLUE-style `sentence<TAB>label` files); with
`model.freeze_encoder`, a linear probe on its pooled output, which is computed once per run
(`Task.featurize`).

Dimension letters: B batch, L max_seq_len, D d_model.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax import config as config_lib
from seqjax.data import pretraining as data_lib
from seqjax.data.batching import RowBatches, padded_batches
from seqjax.nn.bert import BertClassifier
from seqjax.tasks.bert import (
    TOKENIZER_FILE,
    check_model,
    make_encoder,
    model_config,
    model_inputs,
    named_tokenizer,
)
from seqjax.tasks.common import Task, accuracy_sum


def check_finetune(config):
    check_model(config)
    config_lib.expect_positive_int(config, "data.num_classes")
    config_lib.expect_fraction(config, "model.classifier_dropout")
    if "freeze_encoder" in config.model:
        config_lib.expect_type(config, "model.freeze_encoder", bool)
    for key in ("max_examples", "max_documents"):
        if config.data[key] is not None:
            config_lib.expect_positive_int(config, f"data.{key}")
    if config.init_from is not None:
        config_lib.expect_type(config, "init_from", str)
        _check_same_encoder(config)


# What the encoder computes; parameter shapes alone do not tell activation or epsilon apart.
_ENCODER_KEYS = ("num_layers", "d_model", "num_heads", "ffn_hiddens", "max_position",
                 "num_segments", "norm", "activation", "norm_epsilon")


def _check_same_encoder(config):
    """The model section agrees with the saved config of the run in `config.init_from` on
    `_ENCODER_KEYS` (a run saved before a key existed has its default)."""
    config_lib.expect_run_dir(config, "init_from")
    saved = config_lib.load(config.init_from)
    if saved is None or "model" not in saved:
        return  # not a seqjax run: load_init_from says so
    defaults = model_config("tiny")
    keys = _ENCODER_KEYS
    if saved.model.get("attention") == config.model.attention == "local":  # the same windows
        keys += ("block_size", "look_back", "look_ahead")
    differ = [k for k in keys if saved.model.get(k, defaults[k]) != config.model[k]]
    if differ:
        raise ValueError(
            f"config.init_from={config.init_from!r} holds an encoder that computes something "
            f"else: " + "; ".join(f"model.{k}={saved.model.get(k, defaults[k])!r} there, "
                                  f"{config.model[k]!r} here" for k in differ)
            + ". Set " + " ".join(f"--config.model.{k}={saved.model.get(k, defaults[k])}"
                                  for k in differ))


def classification_loss(model: BertClassifier, params, batch, carry=(), *, rng=None,
                        train=False):
    """Summed cross-entropy and accuracy of the sentence labels (`row_weight` 0: padding rows),
    from the tokens or from the frozen encoder's pooled features (`_featurize`)."""
    weights_B = batch.get("row_weight", jnp.ones(batch["labels"].shape[0]))
    args, kw = ((), dict(pooled_BxD=batch["pooled"])) if "pooled" in batch else (
        (batch["tokens"], *model_inputs(batch)), {})
    logits = model.apply(params, *args, **kw, deterministic=not train,
                         rngs={"dropout": rng} if train else {})
    ce_B = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return dict(loss=jnp.sum(ce_B * weights_B), weight=jnp.sum(weights_B),
                accuracy=accuracy_sum(logits, batch["labels"], weights_B)), carry


def build_finetune(config, workdir=None) -> Task:
    check_finetune(config)
    d = config.data
    tokenizer, _ = named_tokenizer(config, workdir)

    def split(name, path):
        sentences, labels = data_lib.load_sst2(name, path)
        if name == "train":
            sentences, labels = sentences[:d.max_examples], labels[:d.max_examples]
        if labels.max() >= d.num_classes:
            raise ValueError(f"{name} labels go up to {labels.max()}; config.data.num_classes="
                             f"{d.num_classes}")
        return dict(data_lib.classification_arrays(tokenizer, sentences, d.max_seq_len),
                    labels=labels)

    frozen = config.model.get("freeze_encoder", False)
    model = BertClassifier(make_encoder(config, tokenizer.get_vocab_size()),
                           num_classes=d.num_classes, dropout_rate=config.model.classifier_dropout,
                           frozen_encoder=frozen)

    def init_params(rng):
        tokens = jnp.zeros((1, d.max_seq_len), jnp.int32)
        return model.init(rng, tokens, tokens, tokens > 0)

    task = Task(init_params=init_params, loss=functools.partial(classification_loss, model),
                train_batch=RowBatches(split("train", d.train_file), d.batch_size,
                                       seed=config.seed, shard_index=jax.process_index(),
                                       num_shards=jax.process_count(), what="sentences"),
                eval_batches=padded_batches(split("dev", d.valid_file), d.eval_batch_size,
                                            what="validation sentences"),
                batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
                tokens_per_batch=d.batch_size * d.max_seq_len,
                files={TOKENIZER_FILE: tokenizer.to_str()},
                frozen=("encoder", "pooler") if frozen else ())
    if frozen:
        task = dataclasses.replace(task, featurize=functools.partial(_featurize, model))
    return task


def _featurize(model: BertClassifier, task: Task, params) -> Task:
    """`task` on the pooled output of the frozen encoder of `params`, computed once for every
    training and validation sentence: the same minibatches and losses as the task on tokens
    (dropout draws the same masks), with a step that runs only the classifier."""
    pooled = jax.jit(lambda params, b: model.apply(
        params, b["tokens"], *model_inputs(b), features=True))

    def features(batch):
        return dict(pooled=np.asarray(pooled(params, batch)), labels=batch["labels"],
                    **{k: batch[k] for k in ("row_weight",) if k in batch})

    rows = task.train_batch.arrays
    train = [features(b) for b in padded_batches(rows, task.eval_batch_size)]
    train_pooled = np.concatenate([b["pooled"] for b in train])[:task.train_batch.num_rows]
    return dataclasses.replace(
        task, featurize=None,
        train_batch=task.train_batch.with_arrays(dict(pooled=train_pooled, labels=rows["labels"])),
        eval_batches=[features(b) for b in task.eval_batches])
