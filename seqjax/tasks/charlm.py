"""Character-level language modelling on a text corpus (The Time Machine by default).

The textbook setup: letters lowercased and every run of other characters turned into one
space, a character vocabulary, random or sequential partitioning into (batch, num_steps)
minibatches, perplexity = exp(mean cross-entropy), and temperature sampling from a prefix.
With sequential partitioning the hidden state is carried from one minibatch to the next
(truncated backpropagation through time), and validation runs over the held-out stream the
same way.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import config as config_lib
from seqjax import decoding
from seqjax.data import text as text_lib
from seqjax.nn import initializers
from seqjax.nn.linear_recurrent import LINEAR_CELLS, SCAN_METHODS
from seqjax.nn.lm import RecurrentLM
from seqjax.nn.recurrent import CELLS
from seqjax.tasks.common import (
    Task,
    check_precision,
    lm_sums,
    precision,
    saved_file,
    with_perplexity,
)

VOCAB_FILE = "vocab.json"


def check_data_and_sample(config):
    """Checks config.data and config.sample, which every character-level LM task shares."""
    d = config.data
    config_lib.expect(d.preprocess in text_lib.PREPROCESS_MODES, "data.preprocess", d.preprocess,
                      f"expected one of {text_lib.PREPROCESS_MODES}")
    config_lib.expect(d.partition in text_lib.PARTITIONS, "data.partition", d.partition,
                      f"expected one of {text_lib.PARTITIONS}")
    config_lib.expect_positive_int(config, "data.batch_size", "data.num_steps",
                                   "data.eval_batch_size")
    config_lib.expect_fraction(config, "data.valid_fraction", low_open=True)
    value = config_lib.expect_type(config, "data.min_freq", int)
    config_lib.expect(value >= 0, "data.min_freq", value, "must be >= 0")
    check_precision(config)
    if config.get("sample"):
        unknown = set(config.sample) - {"prefix", "length", "temperature"}
        config_lib.expect(not unknown, "sample", config.sample.to_dict(),
                          f"unknown options {sorted(unknown)}; expected prefix, length, "
                          f"temperature")
        check_sample_options(prefix_key="config.sample.", **config.sample)


def check_config(config):
    check_data_and_sample(config)
    m = config.model
    config_lib.expect_positive_int(config, "model.hidden", "model.num_layers", "model.unroll")
    config_lib.expect_fraction(config, "model.dropout")
    value = config_lib.expect_type(config, "model.embed_dim", int)
    config_lib.expect(value >= 0, "model.embed_dim", value, "must be >= 0")
    cells = sorted(CELLS) + sorted(LINEAR_CELLS)
    config_lib.expect(m.cell in cells, "model.cell", m.cell, f"expected one of {cells}")
    if m.cell in LINEAR_CELLS and "linear" in m:
        lin = m.linear
        config_lib.expect(lin.scan in SCAN_METHODS, "model.linear.scan", lin.scan,
                          f"expected one of {SCAN_METHODS}")
        config_lib.expect(0 <= lin.r_min < lin.r_max <= 1, "model.linear.r_max", lin.r_max,
                          f"need 0 <= model.linear.r_min={lin.r_min} < r_max <= 1")
        config_lib.expect_type(config, "model.linear.log_space", bool)
    for key in ("kernel", "recurrent", "bias", "head"):
        try:
            initializers.from_spec(m.init[key])
        except (TypeError, ValueError) as e:
            raise ValueError(f"config.model.init.{key}: {e}") from None
    config_lib.expect_type(config, "model.init.forget_bias", (int, float))


def check_sample_options(prefix="time traveller", length=100, temperature=1.0, prefix_key=""):
    """Raises a ValueError naming the option (`prefix_key` + name) that is out of range."""
    def expect(ok, name, value, what):
        if not ok:
            raise ValueError(f"{prefix_key}{name}={value!r}: {what}")
    expect(isinstance(prefix, str) and prefix.strip(), "prefix", prefix,
           "must hold at least one character")
    expect(isinstance(length, int) and not isinstance(length, bool) and length > 0, "length",
           length, "must be a positive integer")
    expect(isinstance(temperature, (int, float)) and math.isfinite(temperature)
           and temperature >= 0, "temperature", temperature, "must be a finite number >= 0")


def make_model(config, vocab_size: int) -> RecurrentLM:
    m = config.model
    init = {f"{key}_init": initializers.from_spec(m.init[key])
            for key in ("kernel", "recurrent", "bias", "head")}
    linear = m.get("linear", {})
    # the config's linear options that this cell's layer has as fields
    options = {f.name for f in dataclasses.fields(LINEAR_CELLS[m.cell])} if m.cell in LINEAR_CELLS \
        else ()
    return RecurrentLM(vocab_size=vocab_size, cell=m.cell, hidden=m.hidden,
                       num_layers=m.num_layers, embed_dim=m.embed_dim, dropout_rate=m.dropout,
                       unroll=m.unroll, forget_bias=m.init.forget_bias, **precision(config),
                       scan_method=linear.get("scan", "associative"),
                       layer_options=tuple((k, linear[k]) for k in sorted(linear) if k in options),
                       **init)


def _vocabulary(config, tokens, workdir):
    """The workdir's saved vocabulary when there is one, so a run always reads its text the way
    its checkpoints were trained; else one built from the corpus."""
    saved = saved_file(workdir, VOCAB_FILE)
    if saved is not None:
        return text_lib.Vocab.from_json(saved)
    return text_lib.Vocab(tokens, min_freq=config.data.min_freq)


def load_corpus(config, workdir=None):
    """(vocab, train_ids, valid_ids) of `config.data`, with the workdir's vocabulary if it has
    one."""
    d = config.data
    text = text_lib.preprocess(text_lib.load_text(d.path), d.preprocess)
    if not text.strip():
        raise ValueError(f"{d.path or 'the corpus'} holds no text after preprocessing "
                         f"(data.preprocess={d.preprocess!r}"
                         + (": it keeps the letters a-z)" if d.preprocess == "letters" else ")"))
    tokens = text_lib.tokenize(text, "char")
    vocab = _vocabulary(config, tokens, workdir)
    return (vocab, *text_lib.split_train_valid(vocab.encode(tokens), d.valid_fraction))


def loss(model: RecurrentLM, params, batch, carry, *, rng=None, train=False):
    """Summed next-character cross-entropy of a batch read from `carry`, and the carry after it.
    A new stream (an epoch's first batch, or every batch with random partitioning) starts from
    a zero state; otherwise the state flows on without gradient (truncated BPTT)."""
    carry = jax.tree.map(lambda c: jnp.where(batch["reset"], jnp.zeros_like(c), c), carry)
    logits_BxTxV, carry = model.apply(params, batch["inputs"], carry, deterministic=not train,
                                      rngs={"dropout": rng} if train else {})
    sums = lm_sums(logits_BxTxV, batch["targets"], batch.get("weights"))
    return sums, jax.lax.stop_gradient(carry)


def build(config, workdir=None) -> Task:
    check_config(config)
    d = config.data
    vocab, train_ids, valid_ids = load_corpus(config, workdir)
    model = make_model(config, len(vocab))

    def init_params(rng):
        tokens_BxT = jnp.zeros((1, d.num_steps), jnp.int32)
        return model.init(rng, tokens_BxT, model.initialize_carry(1))

    def sample_fn(params, prefix_1xP, rng, temperature, length):
        logits_1xPxV, carry = model.apply(params, prefix_1xP, model.initialize_carry(1))
        return decoding.sample(lambda token_1, carry: model.apply(params, token_1[:, None], carry),
                               logits_1xPxV[:, -1], carry, rng, temperature, length)

    return Task(init_params=init_params, loss=functools.partial(loss, model),
                train_batch=lm_batches(config, train_ids),
                eval_batches=text_lib.eval_batches(valid_ids, d.eval_batch_size, d.num_steps),
                batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
                tokens_per_batch=d.batch_size * d.num_steps,
                init_carry=lambda batch_size: jax.device_get(model.initialize_carry(batch_size)),
                report=with_perplexity, files={VOCAB_FILE: vocab.to_json()},
                generate=text_generator(sample_fn, vocab, d.preprocess))


# ------------------------------------------------------------------ shared by the char-LM tasks

def lm_batches(config, train_ids) -> text_lib.LMBatches:
    """This process's training batches of a character stream, a pure function of the step."""
    d = config.data
    return text_lib.LMBatches(train_ids, d.batch_size, d.num_steps, partition=d.partition,
                              seed=config.seed, shard_index=jax.process_index(),
                              num_shards=jax.process_count())


def text_generator(sample_fn, vocab, preprocess_mode, max_tokens=None):
    """`Task.generate` around a jitted `sample_fn(params, prefix_1xP, rng, temperature, length)`:
    the prefix is read as the corpus was, and the result is the prefix plus the sample."""
    sample_fn = jax.jit(sample_fn, static_argnames="length")

    def generate(params, rng, *, prefix="time traveller", length=100, temperature=1.0):
        check_sample_options(prefix, length, temperature)
        prefix_tokens = text_lib.tokenize(text_lib.preprocess(prefix, preprocess_mode), "char")
        if not prefix_tokens:
            raise ValueError(f"prefix={prefix!r} holds no character the model reads")
        if max_tokens and len(prefix_tokens) + length > max_tokens:
            raise ValueError(f"prefix ({len(prefix_tokens)} characters) plus length={length} is "
                             f"longer than the model's context of {max_tokens}")
        ids = sample_fn(params, jnp.asarray(vocab.encode(prefix_tokens))[None], rng,
                        jnp.float32(temperature), length=length)
        return "".join(prefix_tokens) + "".join(vocab.to_tokens(np.asarray(ids).tolist()))

    return generate
