"""Character-level language modelling with a decoder-only Transformer (full or block-local
attention), on the same corpus, vocabulary and held-out split as the recurrent char LM, so
the perplexities compare.

A Transformer has no state to carry: training batches are random windows of `num_steps`
(the context length), and validation cuts the held-out stream into B rows, each read in
windows of `num_steps` from the start of its row (non-overlapping windows: the first
characters of each window see a short context). Sampling uses the key/value cache.
"""

import functools

import jax
import jax.numpy as jnp

from seqjax import config as config_lib
from seqjax import decoding
from seqjax.data import text as text_lib
from seqjax.nn.transformer import TransformerLM
from seqjax.tasks.charlm import (
    VOCAB_FILE,
    check_data_and_sample,
    lm_batches,
    load_corpus,
    text_generator,
)
from seqjax.tasks.common import Task, lm_sums, transformer_config, with_perplexity


def check_config(config):
    check_data_and_sample(config)
    transformer_config(config, max_length_key="data.num_steps")
    config_lib.expect(config.model.get("look_ahead", 0) == 0, "model.look_ahead",
                      config.model.get("look_ahead"), "a causal language model sees no later "
                      "block: use 0")
    if config.get("sample"):
        s = config.sample
        prefix = text_lib.preprocess(s.get("prefix", "time traveller"), config.data.preprocess)
        config_lib.expect(len(prefix) + s.get("length", 100) <= config.data.num_steps,
                          "sample.length", s.get("length"),
                          f"the prefix ({len(prefix)} characters) plus the sample must fit in "
                          f"the context data.num_steps={config.data.num_steps}")


def make_model(config, vocab_size: int, **kwargs) -> TransformerLM:
    hp = transformer_config(config, max_length_key="data.num_steps")
    return TransformerLM(vocab_size, **hp.kwargs(), **kwargs)


def loss(model: TransformerLM, params, batch, carry=(), *, rng=None, train=False):
    """Summed next-character cross-entropy of a batch of windows; no state is carried."""
    logits_BxTxV = model.apply(params, batch["inputs"], deterministic=not train,
                               rngs={"dropout": rng} if train else {})
    return lm_sums(logits_BxTxV, batch["targets"], batch.get("weights")), carry


def build(config, workdir=None) -> Task:
    check_config(config)
    d = config.data
    vocab, train_ids, valid_ids = load_corpus(config, workdir)
    model = make_model(config, len(vocab))
    decoder = make_model(config, len(vocab), decode=True)

    def init_params(rng):
        return model.init(rng, jnp.zeros((1, d.num_steps), jnp.int32))

    def sample_fn(params, prefix_1xP, rng, temperature, length):
        shapes = jax.eval_shape(decoder.init, rng, jnp.zeros((1, d.num_steps), jnp.int32))
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

        def step(token_1x1, cache):
            logits, variables = decoder.apply({**params, "cache": cache}, token_1x1,
                                              mutable=["cache"])
            return logits, variables["cache"]

        logits_1xPxV, cache = step(prefix_1xP, cache)
        return decoding.sample(lambda token_1, cache: step(token_1[:, None], cache),
                               logits_1xPxV[:, -1], cache, rng, temperature, length)

    return Task(init_params=init_params, loss=functools.partial(loss, model),
                train_batch=lm_batches(config, train_ids),
                eval_batches=text_lib.eval_batches(valid_ids, d.eval_batch_size, d.num_steps),
                batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
                tokens_per_batch=d.batch_size * d.num_steps, report=with_perplexity,
                files={VOCAB_FILE: vocab.to_json()},
                generate=text_generator(sample_fn, vocab, d.preprocess, d.num_steps))
