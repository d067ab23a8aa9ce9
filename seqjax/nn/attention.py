"""Attention: score functions, masked softmax, full and block-local attention, multi-head.

Dimension letters: B batch, Q query length, K key length, N length (self-attention),
H heads, D head dimension, E model (embedding) dimension, C number of blocks, S block size,
W window (keys a block's queries see: (1 + look_back) * S).

Attention is a weighted sum of values, with weights softmax_j(a(q, k_j)) over the keys a query
may see (the textbook, "Attention Scoring Functions"):
- scaled dot product: a(q, k) = q . k / sqrt(d);
- additive (Bahdanau): a(q, k) = w_v . tanh(W_q q + W_k k).
Masks are boolean, True where a query may attend. A query with no key to attend to gets zero
weights everywhere (and a zero output), never NaN. Softmax runs in float32 whatever the dtype.

`local_attention` splits a length-N sequence into C = N/S blocks of S positions; the queries
of a block see the keys of their own block and of the `look_back` blocks before it. Its cost
is O(N * S * (1 + look_back)), i.e. O(N^2 / C) for look_back 0: no [N, N] array, not even a
mask, is ever built. (`jax.nn.dot_product_attention(local_window_size=...)` on its XLA path
still materialises the [N, N] scores.)
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from seqjax.nn import position

Dtype = Any
ATTENTION_KINDS = ("full", "local")
NEG = np.float32(-1e30)  # a finite -inf: exp(NEG - max) is 0, and no inf - inf


# ----------------------------------------------------------------------------- softmax and scores

def softmax_where(scores, mask=None):
    """softmax over the last axis restricted to `mask` (True = keep), in float32; a row with
    no True entry gives all zeros."""
    scores = scores.astype(jnp.float32)
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    weights = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.where(mask, weights, 0.0)


def valid_length_mask(valid_lens, length: int):
    """[..., length] boolean mask, True at positions < valid_lens[...]."""
    return jnp.arange(length) < jnp.asarray(valid_lens)[..., None]


def masked_softmax(scores, valid_lens=None):
    """The textbook's masked softmax: softmax over the last axis (keys) of `scores`, keeping
    only the first valid_lens keys of each row. `valid_lens` has the shape of a prefix of
    scores.shape[:-1], e.g. [B] (one length per example) or [B, Q] (one per query row) for
    scores [B, Q, K]. A row with valid length 0 gives zeros."""
    if valid_lens is None:
        return softmax_where(scores)
    valid_lens = jnp.asarray(valid_lens)
    if valid_lens.shape != scores.shape[:valid_lens.ndim] or valid_lens.ndim >= scores.ndim:
        raise ValueError(f"valid_lens of shape {valid_lens.shape} must have the shape of a "
                         f"prefix of scores.shape[:-1] = {scores.shape[:-1]}")
    lens = valid_lens.reshape(valid_lens.shape + (1,) * (scores.ndim - 1 - valid_lens.ndim))
    return softmax_where(scores, valid_length_mask(lens, scores.shape[-1]))


def additive_scores(q_BxQxA, k_BxKxA, w_v_A):
    """Bahdanau scores w_v . tanh(q + k) for every (query, key) pair: [B, Q, K]. The inputs are
    already projected (q W_q and k W_k) to the attention's hidden size A."""
    features_BxQxKxA = jnp.tanh(q_BxQxA[..., :, None, :] + k_BxKxA[..., None, :, :])
    return features_BxQxKxA @ w_v_A


def _scaled(q, dtype=None):
    return q * jnp.asarray(1.0 / np.sqrt(q.shape[-1]), dtype or q.dtype)


def dot_product_weights(q_BxQxHxD, k_BxKxHxD, mask=None, bias=None):
    """Attention weights [B, H, Q, K] (float32) of scaled dot-product scores; `mask` (bool)
    and `bias` (added to the scores) broadcast to [B, H, Q, K]."""
    scores = jnp.einsum("...qhd,...khd->...hqk", _scaled(q_BxQxHxD), k_BxKxHxD)
    if bias is not None:
        scores = scores + bias
    return softmax_where(scores, mask)


def _dropout(weights, rate, rng):
    if rate == 0.0 or rng is None:
        return weights
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0)


def dot_product_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, mask=None, bias=None, *,
                          dropout_rate: float = 0.0, dropout_rng=None):
    """Full scaled dot-product attention: [B, Q, H, D]. Dropout (on the weights) runs when a
    `dropout_rng` is given."""
    weights = dot_product_weights(q_BxQxHxD, k_BxKxHxD, mask, bias)
    weights = _dropout(weights, dropout_rate, dropout_rng).astype(v_BxKxHxD.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", weights, v_BxKxHxD)


# ----------------------------------------------------------------------------- block-local

def _check_local(block_size, look_back):
    for name, value, low in (("block_size", block_size, 1), ("look_back", look_back, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


def _windows(x_BxHxCxSxD, look_back: int):
    """[B, H, C, (1 + look_back) * S, D]: each block preceded by the `look_back` blocks before
    it (zeros before the first block), oldest first."""
    if look_back == 0:
        return x_BxHxCxSxD
    padded = jnp.pad(x_BxHxCxSxD, [(0, 0), (0, 0), (look_back, 0), (0, 0), (0, 0)])
    C = x_BxHxCxSxD.shape[2]
    return jnp.concatenate([padded[:, :, j:j + C] for j in range(look_back + 1)], axis=3)


def local_window_mask(length: int, block_size: int, look_back: int = 0, causal: bool = False):
    """The [N, N] mask that `local_attention` applies without building it: query i may see key
    j iff j's block is i's block or one of the `look_back` before it (and j <= i if causal).
    A reference for tests and plots."""
    block = np.arange(length) // block_size
    allowed = (block[None, :] <= block[:, None]) & (block[None, :] >= block[:, None] - look_back)
    if causal:
        allowed &= np.arange(length)[None, :] <= np.arange(length)[:, None]
    return allowed


def local_attention(q_BxNxHxD, k_BxNxHxD, v_BxNxHxD, *, block_size: int, causal: bool = False,
                    look_back: int = 0, mask=None, dropout_rate: float = 0.0, dropout_rng=None):
    """Block-local self-attention: [B, N, H, D].

    Positions are split into contiguous blocks of `block_size`; a query attends to the keys of
    its own block and of the `look_back` blocks before it, only to keys <= itself if `causal`,
    and only to real tokens if `mask` ([B, N], True = a real token) is given. A length that is
    not a multiple of `block_size` is padded internally and the result trimmed.
    """
    _check_local(block_size, look_back)
    if not (q_BxNxHxD.shape[:2] == k_BxNxHxD.shape[:2] == v_BxNxHxD.shape[:2]):
        raise ValueError(f"local_attention is self-attention: q, k, v must share [batch, length], "
                         f"got {q_BxNxHxD.shape}, {k_BxNxHxD.shape}, {v_BxNxHxD.shape}")
    B, N, H, D = q_BxNxHxD.shape
    S, W = block_size, (1 + look_back) * block_size
    C = -(-N // S)
    P = C * S - N  # internal padding

    def blocks(x):  # [B, N, H, D] -> head-major [B, H, C, S, D]: both einsums are plain matmuls
        x = jnp.pad(x, [(0, 0), (0, P), (0, 0), (0, 0)]).reshape(B, C, S, H, x.shape[-1])
        return jnp.transpose(x, (0, 3, 1, 2, 4))

    # The mask is an additive finite bias (one add, no select over the scores): keys of
    # padding, of blocks before the start, and (if causal) later keys get NEG.
    bias_CxSxW = np.zeros((C, S, W), np.float32)
    for c in range(min(look_back, C)):
        bias_CxSxW[c, :, :(look_back - c) * S] = NEG
    if causal:  # key offset in the window <= query offset + the look_back blocks before it
        bias_CxSxW[:, np.arange(W)[None, :] > np.arange(S)[:, None] + look_back * S] = NEG
    bias = jnp.asarray(bias_CxSxW)
    if mask is not None or P:
        key_ok_BxN = jnp.ones((B, N), bool) if mask is None else jnp.broadcast_to(mask, (B, N))
        key_ok_BxCxS = jnp.pad(key_ok_BxN, [(0, 0), (0, P)]).reshape(B, 1, C, S, 1)
        key_ok_BxCxW = _windows(key_ok_BxCxS, look_back)[..., 0]  # [B, 1, C, W]
        bias = bias + jnp.where(key_ok_BxCxW, 0.0, NEG)[:, :, :, None, :]

    q_BxHxCxSxD = blocks(_scaled(q_BxNxHxD))
    k_BxHxCxWxD, v_BxHxCxWxD = _windows(blocks(k_BxNxHxD), look_back), _windows(blocks(v_BxNxHxD), look_back)
    scores = jnp.einsum("bhcqd,bhckd->bhcqk", q_BxHxCxSxD, k_BxHxCxWxD).astype(jnp.float32) + bias
    max_scores = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    exp = jnp.exp(scores - max_scores)
    seen = max_scores > NEG / 2  # a query with at least one key it may attend to
    total = jnp.sum(exp, axis=-1, keepdims=True)
    if dropout_rate and dropout_rng is not None:
        weights = _dropout(jnp.where(seen, exp / total, 0.0), dropout_rate, dropout_rng)
        out = jnp.einsum("bhcqk,bhckd->bhcqd", weights.astype(v_BxNxHxD.dtype), v_BxHxCxWxD)
    else:  # normalise after the second einsum: a divide over [S, D] instead of [S, W]
        out = jnp.einsum("bhcqk,bhckd->bhcqd", exp.astype(v_BxNxHxD.dtype), v_BxHxCxWxD)
        out = jnp.where(seen, out / total.astype(out.dtype), 0.0).astype(out.dtype)
    # D of the values, which (as in dot_product_attention) may differ from the queries' D
    out_BxNxHxD = jnp.transpose(out, (0, 2, 3, 1, 4)).reshape(B, C * S, H, v_BxNxHxD.shape[-1])
    return out_BxNxHxD[:, :N]


# ----------------------------------------------------------------------------- modules

class AdditiveAttention(nn.Module):
    """The textbook's additive attention: queries [B, Q, Dq], keys [B, K, Dk], values
    [B, K, Dv], `valid_lens` [B] or [B, Q] -> [B, Q, Dv]. The weights [B, Q, K] are sown
    into the 'intermediates' collection as `attention_weights`."""

    num_hiddens: int
    dropout_rate: float = 0.0
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, values, valid_lens=None, *, deterministic: bool = True):
        dense = functools.partial(nn.Dense, self.num_hiddens, use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        w_v = self.param("w_v", nn.initializers.lecun_normal(), (self.num_hiddens, 1),
                         self.param_dtype)
        q, k, w_v = nn.dtypes.promote_dtype(dense(name="W_q")(queries), dense(name="W_k")(keys),
                                            w_v[:, 0], dtype=self.dtype)
        weights = masked_softmax(additive_scores(q, k, w_v), valid_lens)
        self.sow("intermediates", "attention_weights", weights)
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
        return weights.astype(values.dtype) @ values


class MultiHeadAttention(nn.Module):
    """Multi-head attention: inputs_q [B, Q, E] (and inputs_kv [B, K, E'] for cross-attention,
    else self-attention) -> [B, Q, out_features or E].

    Parameters W_q, W_k, W_v ([E, H, D] kernels and [H, D] biases) and W_o ([H, D, E]) have the
    layout of Flax's `nn.MultiHeadDotProductAttention` (query, key, value, out), so weights copy
    over by name. `attention='local'` uses `local_attention` (self-attention only) with
    `block_size` and `look_back`. `causal` masks later keys; `mask` is a key-padding mask
    [B, K] (True = a real token). `rotary` applies rotary position embeddings to q and k.

    Decoding: with `decode=True`, calling `init` with a [B, max_length, E] input creates a
    'cache' collection (keys, values and the index of the next position); each later call,
    with 'cache' mutable, appends its positions' keys and values and attends over the cache,
    so generating token t costs O(t) (O(block_size * (1 + look_back)) for local attention).
    """

    num_heads: int
    qkv_features: Optional[int] = None
    out_features: Optional[int] = None
    attention: str = "full"
    block_size: int = 128
    look_back: int = 0
    causal: bool = False
    rotary: bool = False
    dropout_rate: float = 0.0
    decode: bool = False
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, inputs_q, inputs_kv=None, *, mask=None, deterministic: bool = True):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r}: expected one of {ATTENTION_KINDS}")
        local = self.attention == "local"
        if local:
            _check_local(self.block_size, self.look_back)
        features = self.qkv_features or inputs_q.shape[-1]
        if features % self.num_heads:
            raise ValueError(f"qkv_features={features} is not divisible by "
                             f"num_heads={self.num_heads}")
        if inputs_kv is not None and (local or self.causal or self.rotary or self.decode):
            raise ValueError("local, causal, rotary and decode attention are for "
                             "self-attention only")
        if self.decode and not self.causal:
            raise ValueError("decode=True (a key/value cache) needs causal=True")
        self_attention = inputs_kv is None
        inputs_kv = inputs_q if self_attention else inputs_kv
        dense = functools.partial(nn.DenseGeneral, features=(self.num_heads,
                                                             features // self.num_heads),
                                  use_bias=self.use_bias, dtype=self.dtype,
                                  param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        q = dense(name="W_q")(inputs_q)
        k = dense(name="W_k")(inputs_kv)
        v = dense(name="W_v")(inputs_kv)

        dropout_rng = None
        if self.dropout_rate > 0 and not deterministic:
            dropout_rng = self.make_rng("dropout")

        if self.decode and self.has_variable("cache", "cached_key"):
            out = self._decode_step(q, k, v, mask)
        else:
            if self.rotary:
                positions = jnp.arange(q.shape[1])
                q, k = position.rotary(q, positions), position.rotary(k, positions)
            if self.decode:  # init: the cache for inputs of this length
                self.variable("cache", "cached_key", jnp.zeros_like, k)
                self.variable("cache", "cached_value", jnp.zeros_like, v)
                self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            if local:
                out = local_attention(q, k, v, block_size=self.block_size, causal=self.causal,
                                      look_back=self.look_back, mask=mask,
                                      dropout_rate=self.dropout_rate, dropout_rng=dropout_rng)
            else:
                full_mask = None if mask is None else mask[:, None, None, :]
                if self.causal:
                    Q, K = q.shape[1], k.shape[1]
                    causal_QxK = jnp.arange(K)[None, :] <= jnp.arange(Q)[:, None]
                    full_mask = causal_QxK if full_mask is None else full_mask & causal_QxK
                weights = dot_product_weights(q, k, full_mask)
                self.sow("intermediates", "attention_weights", weights)
                weights = _dropout(weights, self.dropout_rate, dropout_rng).astype(v.dtype)
                out = jnp.einsum("...hqk,...khd->...qhd", weights, v)

        return nn.DenseGeneral(self.out_features or inputs_q.shape[-1], axis=(-2, -1),
                               use_bias=self.use_bias, dtype=self.dtype,
                               param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                               name="W_o")(out)

    def _decode_step(self, q, k, v, mask):
        """Appends this call's L positions to the cache and attends over it. The caller keeps
        the index below the cache length (positions past it would be dropped)."""
        cached_key = self.variable("cache", "cached_key")
        cached_value = self.variable("cache", "cached_value")
        cache_index = self.variable("cache", "cache_index")
        index, L, max_length = cache_index.value, q.shape[1], cached_key.value.shape[1]
        q_positions = index + jnp.arange(L)
        if self.rotary:
            q, k = position.rotary(q, q_positions), position.rotary(k, q_positions)
        start = (0, index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v, start)
        cache_index.value = index + L
        keys, values = cached_key.value, cached_value.value
        k_positions = jnp.arange(max_length)
        if self.attention == "local" and L == 1:  # only the query's window: O(block_size)
            S, W = self.block_size, (1 + self.look_back) * self.block_size
            first = jnp.clip((index // S - self.look_back) * S, 0, max(max_length - W, 0))
            width = min(W, max_length)
            keys = jax.lax.dynamic_slice_in_dim(keys, first, width, axis=1)
            values = jax.lax.dynamic_slice_in_dim(values, first, width, axis=1)
            k_positions = first + jnp.arange(width)
        allowed_QxK = k_positions[None, :] <= q_positions[:, None]
        if self.attention == "local":
            q_block, k_block = q_positions // self.block_size, k_positions // self.block_size
            allowed_QxK &= k_block[None, :] >= q_block[:, None] - self.look_back
        full_mask = allowed_QxK[None, None]
        if mask is not None:  # a key-padding mask over the whole cache, [B, max_length]
            full_mask = full_mask & jax.lax.dynamic_slice_in_dim(
                mask, k_positions[0], k_positions.shape[0], axis=1)[:, None, None, :]
        weights = dot_product_weights(q, keys, full_mask).astype(values.dtype)
        return jnp.einsum("...hqk,...khd->...qhd", weights, values)
