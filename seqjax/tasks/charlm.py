"""Character-level language modelling on a text corpus (The Time Machine by default).

The textbook setup: letters lowercased and every run of other characters turned into one
space, a character vocabulary, random or sequential partitioning into (batch, num_steps)
minibatches, perplexity = exp(mean cross-entropy), and temperature sampling from a prefix.
With sequential partitioning the hidden state is carried from one minibatch to the next
(truncated backpropagation through time), and validation runs over the held-out stream the
same way.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax import config as config_lib
from seqjax.data import text as text_lib
from seqjax.nn import initializers
from seqjax.nn.lm import RecurrentLM
from seqjax.nn.recurrent import CELLS
from seqjax.tasks import Task, saved_file

VOCAB_FILE = "vocab.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def validate_data_and_sample(config):
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
    config_lib.expect(config.model.dtype in DTYPES, "model.dtype", config.model.dtype,
                      f"expected one of {sorted(DTYPES)}")
    if config.get("sample"):
        unknown = set(config.sample) - {"prefix", "length", "temperature"}
        config_lib.expect(not unknown, "sample", config.sample.to_dict(),
                          f"unknown options {sorted(unknown)}; expected prefix, length, temperature")
        check_sample_options(prefix_key="config.sample.", **config.sample)


def validate(config):
    validate_data_and_sample(config)
    m = config.model
    config_lib.expect_positive_int(config, "model.hidden", "model.num_layers", "model.unroll")
    config_lib.expect_fraction(config, "model.dropout")
    value = config_lib.expect_type(config, "model.embed_dim", int)
    config_lib.expect(value >= 0, "model.embed_dim", value, "must be >= 0")
    config_lib.expect(m.cell in CELLS, "model.cell", m.cell, f"expected one of {sorted(CELLS)}")
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
    return RecurrentLM(vocab_size=vocab_size, cell=m.cell, hidden=m.hidden,
                       num_layers=m.num_layers, embed_dim=m.embed_dim, dropout_rate=m.dropout,
                       unroll=m.unroll, dtype=DTYPES[m.dtype], forget_bias=m.init.forget_bias,
                       **init)


def _vocabulary(config, tokens, workdir):
    """The workdir's saved vocabulary when there is one, so a run always reads its text the way
    its checkpoints were trained; else one built from the corpus."""
    saved = saved_file(workdir, VOCAB_FILE)
    if saved is not None:
        return text_lib.Vocab.from_json(saved)
    return text_lib.Vocab(tokens, min_freq=config.data.min_freq)


def load_corpus(config, workdir=None):
    """(vocab, train_ids, valid_ids) of `config.data`, with the workdir's vocabulary if it has one."""
    d = config.data
    tokens = text_lib.tokenize(text_lib.preprocess(text_lib.load_text(d.path), d.preprocess), "char")
    vocab = _vocabulary(config, tokens, workdir)
    return (vocab, *text_lib.split_train_valid(vocab.encode(tokens), d.valid_fraction))


def build(config, workdir=None) -> Task:
    validate(config)
    d = config.data
    vocab, train_ids, valid_ids = load_corpus(config, workdir)
    batches = text_lib.LMBatches(train_ids, d.batch_size, d.num_steps, partition=d.partition,
                                 seed=config.seed, shard_index=jax.process_index(),
                                 num_shards=jax.process_count())
    eval_batches = text_lib.eval_batches(valid_ids, d.eval_batch_size, d.num_steps)
    model = make_model(config, len(vocab))

    def init_params(rng):
        tokens_BxT = jnp.zeros((1, d.num_steps), jnp.int32)
        return model.init(rng, tokens_BxT, model.initialize_carry(1))

    def init_carry(batch_size):
        return jax.device_get(model.initialize_carry(batch_size))

    def loss(params, batch, carry, rng, train):
        # A new stream (an epoch's first batch, or every batch with random partitioning) starts
        # from a zero state; otherwise the state flows on without gradient (truncated BPTT).
        carry = jax.tree.map(lambda c: jnp.where(batch["reset"], jnp.zeros_like(c), c), carry)
        logits_BxTxV, carry = model.apply(params, batch["inputs"], carry, deterministic=not train,
                                          rngs={"dropout": rng} if train else {})
        return lm_sums(logits_BxTxV, batch), jax.lax.stop_gradient(carry)

    def sample_fn(params, prefix_1xP, rng, temperature, length):
        logits_1xPxV, carry = model.apply(params, prefix_1xP, model.initialize_carry(1))
        return sample_tokens(lambda token_1, carry: model.apply(params, token_1[:, None], carry),
                             logits_1xPxV[:, -1], carry, rng, temperature, length)

    return Task(init_params=init_params, init_carry=init_carry, loss=loss,
                train_batch=batches, eval_batches=lambda: eval_batches,
                batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
                tokens_per_batch=d.batch_size * d.num_steps, report=report,
                files={VOCAB_FILE: vocab.to_json()},
                generate=text_generator(sample_fn, vocab, d.preprocess))


# ----------------------------------------------------------------------------- shared by LM tasks

def lm_sums(logits_BxTxV, batch) -> dict:
    """Summed next-token cross-entropy and its weight (padding has weight 0 in eval batches)."""
    ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])
    weights_BxT = batch.get("weights", jnp.ones_like(ce_BxT))
    return {"loss": jnp.sum(ce_BxT * weights_BxT), "weight": jnp.sum(weights_BxT)}


def report(means):
    return dict(means, perplexity=math.exp(min(means["loss"], 700.0)))


def sample_tokens(step_fn, logits_1xV, state, rng, temperature, length):
    """Draws `length` tokens from softmax(logits / temperature), feeding each back in with
    `step_fn(token_1, state) -> (logits_1x1xV, state)`; temperature 0 takes the most likely."""
    def step(carry, key):
        logits_1xV, state = carry
        scaled = logits_1xV / jnp.maximum(temperature, 1e-6)
        token_1 = jnp.where(temperature > 0, jax.random.categorical(key, scaled),
                            jnp.argmax(logits_1xV, axis=-1))
        logits_1x1xV, state = step_fn(token_1, state)
        return (logits_1x1xV[:, -1], state), token_1[0]

    _, tokens = jax.lax.scan(step, (logits_1xV, state), jax.random.split(rng, length))
    return tokens


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
