"""Encoder-decoder models: the Transformer and the GRU with additive attention.

Causality by gradient, padded source positions ignored, and incremental decoding (key/value
cache, or the recurrent state) equal to decoding the whole prefix at every step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn.seq2seq import Seq2SeqAttentionDecoder, Seq2SeqEncoder
from seqjax.nn.transformer import EncoderDecoder, TransformerDecoder, TransformerEncoder

import reference

SRC_V, TGT_V, S, T = 13, 11, 7, 9
TRANSFORMER = dict(num_layers=2, d_model=16, num_heads=2, ffn_hiddens=24, max_length=T)


def _transformer(**overrides):
    hp = {**TRANSFORMER, **overrides}
    return EncoderDecoder(TransformerEncoder(SRC_V, **hp), TransformerDecoder(TGT_V, **hp))


def _seq2seq(cell="gru"):
    hp = dict(num_layers=2, embed_size=8, num_hiddens=12, cell=cell)
    return EncoderDecoder(Seq2SeqEncoder(SRC_V, **hp), Seq2SeqAttentionDecoder(TGT_V, **hp))


MODELS = {
    "transformer_post": functools.partial(_transformer, norm="post"),
    "transformer_pre_learned": functools.partial(_transformer, norm="pre", position="learned"),
    "transformer_rotary_local": functools.partial(_transformer, position="rotary",
                                                  attention="local", block_size=3, look_back=1),
    "seq2seq_gru": _seq2seq,
    "seq2seq_lstm": functools.partial(_seq2seq, "lstm"),
}


def _inputs(seed=0, batch=3):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, SRC_V, (batch, S)).astype(np.int32)
    src_len = np.array([S, 4, 1][:batch], np.int32)
    tgt = np.stack([rng.permutation(TGT_V)[:T] for _ in range(batch)]).astype(np.int32)
    return src, src_len, tgt


@functools.lru_cache(maxsize=None)
def _init(name):
    model = MODELS[name]()
    src, src_len, tgt = _inputs()
    return model, model.init(jax.random.PRNGKey(1), src, src_len, tgt)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_incremental_decoding_equals_the_whole_prefix(name):
    model, params = _init(name)
    src, src_len, tgt = _inputs(seed=2)
    cached = model
    if isinstance(model.decoder, TransformerDecoder):
        cached = model.clone(decoder=model.decoder.clone(decode=True))
    cache = cached.init(jax.random.PRNGKey(0), src, src_len, tgt).get("cache", {})
    memory = cached.apply(params, src, src_len, method=cached.encode)
    for t in range(T):
        if cache:
            (logits, memory), variables = cached.apply(
                {**params, "cache": cache}, tgt[:, t:t + 1], memory, method=cached.decode,
                mutable=["cache"])
            cache = variables["cache"]
        else:
            logits, memory = cached.apply(params, tgt[:, t:t + 1], memory, method=cached.decode)
        prefix = model.apply(params, src, src_len, tgt[:, :t + 1])
        np.testing.assert_allclose(logits[:, 0], prefix[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_decoder_is_causal_by_gradient(name):
    """Every target token is distinct, so the gradient of the logits at step t with respect
    to the embedding row of a later target token is exactly zero (and non-zero for an earlier
    one): the decoder never sees the future."""
    model, params = _init(name)
    src, src_len, tgt = _inputs(seed=3, batch=1)
    t = 4
    grads = jax.grad(lambda p: model.apply(p, src, src_len, tgt)[:, t].sum())(params)
    table = np.asarray(grads["params"]["decoder"]["embed"]["embedding"])
    row_norms = np.abs(table[tgt[0]]).sum(-1)  # [T]: by target position
    assert np.all(row_norms[t + 1:] == 0), row_norms
    assert np.all(row_norms[:t + 1] > 0), row_norms


@pytest.mark.parametrize("name", sorted(MODELS))
def test_encoder_ignores_padded_source_positions(name):
    model, params = _init(name)
    src, src_len, tgt = _inputs(seed=4)
    other = src.copy()
    for b, n in enumerate(src_len):
        other[b, n:] = (src[b, n:] + 1 + b) % SRC_V
    assert (other != src).any()
    np.testing.assert_array_equal(model.apply(params, src, src_len, tgt),
                                  model.apply(params, other, src_len, tgt))
    # and the real tokens matter
    changed = src.copy()
    changed[:, 0] = (src[:, 0] + 1) % SRC_V
    assert not np.allclose(model.apply(params, changed, src_len, tgt),
                           model.apply(params, src, src_len, tgt))


def test_transformer_parameter_tree_names_the_sublayers():
    _, params = _init("transformer_post")
    block = params["params"]["decoder"]["block0"]
    assert set(block) == {"self_attention", "cross_attention", "ffn", "addnorm1", "addnorm2",
                          "addnorm3"}
    assert set(params["params"]["encoder"]["block0"]) == {"attention", "ffn", "addnorm1",
                                                          "addnorm2"}
    assert block["cross_attention"]["W_k"]["kernel"].shape == (16, 2, 8)


def test_target_longer_than_the_model_is_a_clear_error():
    model, params = _init("transformer_post")
    src, src_len, _ = _inputs()
    with pytest.raises(ValueError, match="longer than the model's max_length"):
        model.apply(params, src, src_len, jnp.zeros((3, T + 1), jnp.int32))


def test_decoder_block_matches_numpy():
    """Post-norm DecoderBlock: LN(x + causal self-attention), LN(. + cross-attention to the
    real source positions), LN(. + FFN), against NumPy loops with the same weights."""
    from seqjax.nn.transformer import DecoderBlock
    rng = np.random.default_rng(0)
    x, memory = rng.normal(size=(2, 5, 16)), rng.normal(size=(2, 4, 16))
    memory_mask = np.arange(4)[None] < np.array([[4], [2]])
    block = DecoderBlock(num_heads=2, ffn_hiddens=24)
    params = block.init(jax.random.PRNGKey(0), x, memory, memory_mask)
    params = jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(np.float32), params)
    got = block.apply(params, x, memory, memory_mask)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    for b in range(2):
        y = reference.layer_norm(x[b] + reference.attention(p["self_attention"], x[b], x[b],
                                                np.tril(np.ones((5, 5), bool))),
                                 p["addnorm1"]["ln"])
        y = reference.layer_norm(y + reference.attention(p["cross_attention"], y, memory[b],
                                             np.broadcast_to(memory_mask[b], (5, 4))),
                           p["addnorm2"]["ln"])
        ffn = p["ffn"]
        hidden = np.maximum(y @ ffn["dense1"]["kernel"] + ffn["dense1"]["bias"], 0)
        y = reference.layer_norm(y + hidden @ ffn["dense2"]["kernel"] + ffn["dense2"]["bias"],
                           p["addnorm3"]["ln"])
        np.testing.assert_allclose(got[b], y, rtol=1e-4, atol=1e-4)
