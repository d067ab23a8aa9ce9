"""Character-level language modelling with a decoder-only Transformer (full or block-local
attention), on the same corpus, vocabulary and held-out split as the recurrent char LM, so
the perplexities compare.

A Transformer has no state to carry: training batches are random windows of `num_steps`
(the context length), and validation cuts the held-out stream into B rows, each read in
windows of `num_steps` from the start of its row (non-overlapping windows: the first
characters of each window see a short context). Sampling uses the key/value cache.
"""

import jax
import jax.numpy as jnp

from seqjax import config as config_lib
from seqjax.data import text as text_lib
from seqjax.nn import attention, position
from seqjax.nn.transformer import NORMS, TransformerLM
from seqjax.tasks import Task
from seqjax.tasks.charlm import (DTYPES, VOCAB_FILE, lm_sums, load_corpus, report, sample_tokens,
                                 text_generator, validate_data_and_sample)


def validate(config):
    validate_data_and_sample(config)
    m = config.model
    config_lib.expect_positive_int(config, "model.num_layers", "model.d_model",
                                   "model.num_heads", "model.ffn_hiddens", "model.block_size")
    config_lib.expect_fraction(config, "model.dropout")
    config_lib.expect_fraction(config, "model.attention_dropout")
    look_back = config_lib.expect_type(config, "model.look_back", int)
    config_lib.expect(look_back >= 0, "model.look_back", look_back, "must be >= 0")
    config_lib.expect(m.d_model % m.num_heads == 0, "model.d_model", m.d_model,
                      f"must be divisible by model.num_heads={m.num_heads}")
    config_lib.expect(m.attention in attention.ATTENTION_KINDS, "model.attention", m.attention,
                      f"expected one of {attention.ATTENTION_KINDS}")
    config_lib.expect(m.position in position.ENCODINGS, "model.position", m.position,
                      f"expected one of {position.ENCODINGS}")
    config_lib.expect(m.norm in NORMS, "model.norm", m.norm, f"expected one of {NORMS}")
    config_lib.expect(m.activation in ("relu", "gelu"), "model.activation", m.activation,
                      "expected 'relu' or 'gelu'")
    config_lib.expect(m.position != "rotary" or (m.d_model // m.num_heads) % 2 == 0,
                      "model.position", m.position, "rotary needs an even head dimension")
    if config.get("sample"):
        s = config.sample
        prefix = text_lib.preprocess(s.get("prefix", "time traveller"), config.data.preprocess)
        config_lib.expect(len(prefix) + s.get("length", 100) <= config.data.num_steps,
                          "sample.length", s.get("length"),
                          f"the prefix ({len(prefix)} characters) plus the sample must fit in "
                          f"the context data.num_steps={config.data.num_steps}")


def make_model(config, vocab_size: int, **kwargs) -> TransformerLM:
    m = config.model
    return TransformerLM(
        vocab_size=vocab_size, num_layers=m.num_layers, d_model=m.d_model,
        num_heads=m.num_heads, ffn_hiddens=m.ffn_hiddens, max_length=config.data.num_steps,
        position=m.position, attention=m.attention, block_size=m.block_size,
        look_back=m.look_back, dropout_rate=m.dropout,
        attention_dropout_rate=m.attention_dropout, norm=m.norm, activation=m.activation,
        dtype=DTYPES[m.dtype], **kwargs)


def build(config, workdir=None) -> Task:
    validate(config)
    d = config.data
    vocab, train_ids, valid_ids = load_corpus(config, workdir)
    batches = text_lib.LMBatches(train_ids, d.batch_size, d.num_steps, partition=d.partition,
                                 seed=config.seed, shard_index=jax.process_index(),
                                 num_shards=jax.process_count())
    eval_batches = text_lib.eval_batches(valid_ids, d.eval_batch_size, d.num_steps)
    model = make_model(config, len(vocab))
    decoder = make_model(config, len(vocab), decode=True)

    def init_params(rng):
        return model.init(rng, jnp.zeros((1, d.num_steps), jnp.int32))

    def loss(params, batch, carry, rng, train):
        logits_BxTxV = model.apply(params, batch["inputs"], deterministic=not train,
                                   rngs={"dropout": rng} if train else {})
        return lm_sums(logits_BxTxV, batch), carry

    def sample_fn(params, prefix_1xP, rng, temperature, length):
        shapes = jax.eval_shape(decoder.init, rng, jnp.zeros((1, d.num_steps), jnp.int32))
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

        def step(token_1x1, cache):
            logits, variables = decoder.apply({**params, "cache": cache}, token_1x1,
                                              mutable=["cache"])
            return logits, variables["cache"]

        logits_1xPxV, cache = step(prefix_1xP, cache)
        return sample_tokens(lambda token_1, cache: step(token_1[:, None], cache),
                             logits_1xPxV[:, -1], cache, rng, temperature, length)

    return Task(init_params=init_params, init_carry=lambda batch_size: (), loss=loss,
                train_batch=batches, eval_batches=lambda: eval_batches,
                batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
                tokens_per_batch=d.batch_size * d.num_steps, report=report,
                files={VOCAB_FILE: vocab.to_json()},
                generate=text_generator(sample_fn, vocab, d.preprocess, d.num_steps))
