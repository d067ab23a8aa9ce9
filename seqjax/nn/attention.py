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
from typing import Any, Callable, NamedTuple, Optional

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

def _check_int(name, value, low):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


def _check_local(block_size, look_back):
    _check_int("block_size", block_size, 1)
    _check_int("look_back", look_back, 0)


def local_window_mask(length: int, block_size: int, look_back: int = 0, causal: bool = False):
    """The [N, N] mask that `local_attention` applies without building it: query i may see key
    j iff j's block is i's block or one of the `look_back` before it (and j <= i if causal).
    A reference for tests and plots."""
    block = np.arange(length) // block_size
    allowed = (block[None, :] <= block[:, None]) & (block[None, :] >= block[:, None] - look_back)
    if causal:
        allowed &= np.arange(length)[None, :] <= np.arange(length)[:, None]
    return allowed


STEP_SCORES = 2 ** 20  # scores a scan step of local_attention computes by default (4 MiB)


def local_attention(q_BxNxHxD, k_BxNxHxD, v_BxNxHxD, *, block_size: int, causal: bool = False,
                    look_back: int = 0, mask=None, dropout_rate: float = 0.0, dropout_rng=None,
                    blocks_per_step: Optional[int] = None):
    """Block-local self-attention: [B, N, H, D].

    Positions are split into contiguous blocks of `block_size`; a query attends to the keys of
    its own block and of the `look_back` blocks before it, only to keys <= itself if `causal`,
    and only to real tokens if `mask` ([B, N], True = a real token) is given. A length that is
    not a multiple of `block_size` is padded internally and the result trimmed.

    A `lax.scan` runs over steps of `blocks_per_step` blocks (by default as many as keep a
    step's scores within STEP_SCORES, so that a step works in cache), carrying the keys and
    values of the `look_back` blocks before the step. The backward pass is FlashAttention's:
    it keeps q, k, v and each query's log-sum-exp of scores and recomputes a step's weights,
    so no [N, W] array is ever stored. Forward-mode differentiation is not defined.
    """
    _check_local(block_size, look_back)
    if blocks_per_step is not None:
        _check_int("blocks_per_step", blocks_per_step, 1)
    if not (q_BxNxHxD.shape[:2] == k_BxNxHxD.shape[:2] == v_BxNxHxD.shape[:2]):
        raise ValueError(f"local_attention is self-attention: q, k, v must share [batch, length], "
                         f"got {q_BxNxHxD.shape}, {k_BxNxHxD.shape}, {v_BxNxHxD.shape}")
    B, N, H, _ = q_BxNxHxD.shape
    S, W = block_size, (1 + look_back) * block_size
    C = -(-N // S)
    G = min(C, blocks_per_step or max(1, STEP_SCORES // (B * H * S * W)))
    steps = -(-C // G)
    G = -(-C // steps)  # the fewest blocks per step for this many steps: the least padding
    P = steps * G * S - N

    def in_steps(x):  # [B, N, ...] -> [steps, B, G, S, ...]: no copy when B = 1 and P = 0
        x = jnp.pad(x, [(0, 0), (0, P)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((B, steps, G, S) + x.shape[2:]), 1, 0)

    key_ok_BxN = jnp.ones((B, N), bool) if mask is None else jnp.broadcast_to(
        jnp.asarray(mask, bool), (B, N))
    rate = float(dropout_rate) if dropout_rng is not None else 0.0
    config = _Local(S, G, look_back, bool(causal), rate)
    out = _local(in_steps(q_BxNxHxD), in_steps(k_BxNxHxD), in_steps(v_BxNxHxD),
                 in_steps(key_ok_BxN), dropout_rng if rate else None, config)
    out = jnp.moveaxis(out, 0, 1)  # [B, steps, G, S, H, D]
    return out.reshape((B, steps * G * S) + out.shape[4:])[:, :N]


class _Local(NamedTuple):
    block_size: int
    blocks_per_step: int
    look_back: int
    causal: bool
    dropout_rate: float


def _windows(x, before, config: _Local, axis: int):
    """This step's blocks x ([..., G, S, ...], the blocks on `axis`) and the look_back blocks
    `before` them -> each block's window ([..., G, W, ...]: the look_back blocks before it,
    oldest first, then itself) and the look_back blocks before the next step."""
    G, L = config.blocks_per_step, config.look_back
    if L == 0:
        return x, before
    every = jnp.concatenate([before, x], axis=axis)
    part = lambda start, size: lax.slice_in_dim(every, start, start + size, axis=axis)
    return jnp.concatenate([part(j, G) for j in range(L + 1)], axis=axis + 1), part(G, L)


def _window_sums(d_BxHxGxWxD, config: _Local):
    """The transpose of gathering windows: [B, H, G, W, D] gradients -> [B, H, L + G, S, D],
    summed over the windows each block is part of."""
    L, S = config.look_back, config.block_size
    parts = d_BxHxGxWxD.reshape(d_BxHxGxWxD.shape[:3] + (L + 1, S) + d_BxHxGxWxD.shape[4:])
    return sum(jnp.pad(parts[:, :, :, j], [(0, 0), (0, 0), (j, L - j), (0, 0), (0, 0)])
               for j in range(L + 1))


def _step_scores(q_BxHxGxSxD, before, k, v, key_ok, config: _Local):
    """The scaled, masked float32 scores [B, H, G, S, W] of one step, its value windows and
    the look_back blocks of keys, values and key mask before the next step."""
    k_window, k_next = _windows(k, before[0], config, axis=2)
    v_window, v_next = _windows(v, before[1], config, axis=2)
    ok_window, ok_next = _windows(key_ok, before[2], config, axis=1)
    S, W = config.block_size, (1 + config.look_back) * config.block_size
    scores = jnp.einsum("bhgqd,bhgkd->bhgqk", q_BxHxGxSxD, k_window,
                        preferred_element_type=jnp.float32)
    scores += jnp.where(ok_window, 0.0, NEG)[:, None, :, None, :]  # [B, 1, G, 1, W]
    if config.causal:  # key offset in the window <= query offset + the look_back blocks
        scores += np.where(np.arange(W)[None, :] > np.arange(S)[:, None] + W - S, NEG, 0.0)
    return scores, k_window, v_window, (k_next, v_next, ok_next)


def _head_major(x_BxGxSxHxD):
    """[B, G, S, H, D] -> [B, H, G, S, D], where both einsums of a step are plain batched
    matmuls. Done step by step inside the scan, on data in cache."""
    return jnp.transpose(x_BxGxSxHxD, (0, 3, 1, 2, 4))


def _position_major(x_BxHxGxSxD):
    return jnp.transpose(x_BxHxGxSxD, (0, 2, 3, 1, 4))


def _first_before(k, v, config: _Local):
    """The carry of the first step: look_back blocks of zero keys and values, masked out."""
    B, H, L, S = k.shape[1], k.shape[4], config.look_back, config.block_size
    return (jnp.zeros((B, H, L, S, k.shape[-1]), k.dtype),
            jnp.zeros((B, H, L, S, v.shape[-1]), v.dtype), jnp.zeros((B, L, S), bool))


def _keep(dropout_rng, step, shape, rate):
    """Dropout's keep mask of a step, scaled by 1 / (1 - rate); the backward draws it again."""
    keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, step), 1.0 - rate, shape)
    return keep / (1.0 - rate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _local(q, k, v, key_ok, dropout_rng, config: _Local):
    """local_attention on inputs laid out in steps, [steps, B, G, S, H, D] ([steps, B, G, S]
    for key_ok): the output in the same layout."""
    return _local_fwd(q, k, v, key_ok, dropout_rng, config)[0]


def _local_fwd(q, k, v, key_ok, dropout_rng, config: _Local):
    def step(before, inputs):
        i, q_step, k_step, v_step, ok_step = inputs
        q_step, k_step, v_step = (_head_major(x) for x in (q_step, k_step, v_step))
        scores, _, v_window, before = _step_scores(_scaled(q_step), before, k_step, v_step,
                                                   ok_step, config)
        max_scores = jnp.max(scores, axis=-1, keepdims=True)
        exp = jnp.exp(scores - max_scores)
        total = jnp.sum(exp, axis=-1, keepdims=True)
        if config.dropout_rate:
            exp *= _keep(dropout_rng, i, exp.shape, config.dropout_rate)
        out = jnp.einsum("bhgqk,bhgkd->bhgqd", exp.astype(v.dtype), v_window,
                         preferred_element_type=jnp.float32)
        seen = max_scores > NEG / 2  # a query with at least one key it may attend to
        out = jnp.where(seen, out / total, 0.0).astype(v.dtype)
        # +inf for a query that sees no key: its recomputed weights exp(score - inf) are 0
        log_sum_exp = jnp.where(seen, max_scores + jnp.log(total), jnp.inf)[..., 0]
        return before, (_position_major(out), log_sum_exp)

    step_ids = jnp.arange(q.shape[0])
    _, (out, log_sum_exp) = lax.scan(step, _first_before(k, v, config),
                                     (step_ids, q, k, v, key_ok))
    return out, (q, k, v, key_ok, dropout_rng, log_sum_exp)


def _local_bwd(config: _Local, residuals, d_out):
    q, k, v, key_ok, dropout_rng, log_sum_exp = residuals
    G, L = config.blocks_per_step, config.look_back

    def step(carry, inputs):
        before, (dk_sum, dv_sum) = carry
        i, q_step, k_step, v_step, ok_step, d_out_step, lse_step = inputs
        q_step, k_step, v_step, d_out_step = (_head_major(x) for x in (q_step, k_step, v_step,
                                                                        d_out_step))
        q_step = _scaled(q_step)
        scores, k_window, v_window, before = _step_scores(q_step, before, k_step, v_step,
                                                          ok_step, config)
        weights = jnp.exp(scores - lse_step[..., None])
        d_weights = jnp.einsum("bhgqd,bhgkd->bhgqk", d_out_step, v_window,
                               preferred_element_type=jnp.float32)
        dropped = weights
        if config.dropout_rate:
            keep = _keep(dropout_rng, i, weights.shape, config.dropout_rate)
            dropped, d_weights = weights * keep, d_weights * keep
        d_scores = weights * (d_weights - jnp.sum(weights * d_weights, axis=-1, keepdims=True))
        dq = _scaled(jnp.einsum("bhgqk,bhgkd->bhgqd", d_scores.astype(k.dtype), k_window,
                                preferred_element_type=jnp.float32))  # dq has q's D
        dk = jnp.einsum("bhgqk,bhgqd->bhgkd", d_scores.astype(q.dtype), q_step,
                        preferred_element_type=jnp.float32)
        dv = jnp.einsum("bhgqk,bhgqd->bhgkd", dropped.astype(v.dtype), d_out_step,
                        preferred_element_type=jnp.float32)
        if L:  # dk_sum, dv_sum: [B, H, L + G, S, D], the blocks from L before this step on
            dk_sum, dv_sum = dk_sum + _window_sums(dk, config), dv_sum + _window_sums(dv, config)
            dk, dv = dk_sum[:, :, :G], dv_sum[:, :, :G]  # done: no later window holds them
            shift = lambda x: jnp.pad(x[:, :, G:], [(0, 0), (0, 0), (0, G), (0, 0), (0, 0)])
            dk_sum, dv_sum = shift(dk_sum), shift(dv_sum)
        return (before, (dk_sum, dv_sum)), tuple(_position_major(d.astype(x.dtype))
                                                 for d, x in ((dq, q), (dk, k), (dv, v)))

    steps, B, _, S, H, _ = q.shape
    sums = tuple(jnp.zeros((B, H, L + G, S, x.shape[-1]), jnp.float32) for x in (k, v))
    (_, sums), (dq, dk, dv) = lax.scan(step, (_first_before(k, v, config), sums),
                                       (jnp.arange(steps), q, k, v, key_ok, d_out, log_sum_exp))
    if L:  # a step emits the blocks from L before it: blocks -L .. steps*G - L, then the rest
        def realign(d, d_sum):  # d [steps, B, G, S, H, D]; d_sum [B, H, L + G, S, D]
            blocks = jnp.moveaxis(d, 0, 1).reshape((B, steps * G) + d.shape[3:])
            rest = _position_major(d_sum[:, :, :L]).astype(d.dtype)
            blocks = jnp.concatenate([blocks, rest], axis=1)[:, L:]
            return jnp.moveaxis(blocks.reshape((B, steps, G) + d.shape[3:]), 1, 0)
        dk, dv = realign(dk, sums[0]), realign(dv, sums[1])
    return dq, dk, dv, None, None


_local.defvjp(_local_fwd, _local_bwd)


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
