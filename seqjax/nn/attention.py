"""Attention: score functions, masked softmax, full and block-local attention, multi-head.

Dimension letters: B batch, Q query length, K key length, N length (self-attention),
H heads, D head dimension, E model (embedding) dimension, C number of blocks, S block size,
W window (keys a block's queries see: (1 + look_back + look_ahead) * S).

Attention is a weighted sum of values, with weights softmax_j(a(q, k_j)) over the keys a query
may see (the textbook, "Attention Scoring Functions"):
- scaled dot product: a(q, k) = q . k / sqrt(d);
- additive (Bahdanau): a(q, k) = w_v . tanh(W_q q + W_k k).
Masks are boolean, True where a query may attend. A query with no key to attend to gets zero
weights everywhere (and a zero output), never NaN. Scores come out of their product in float32
(`preferred_element_type`, not a bfloat16 product cast up afterwards) and softmax runs in
float32, whatever the dtype of q, k and v.

Full attention has interchangeable implementations (`ATTENTION_IMPLS`): 'seqjax' (this
module's einsums, the reference), 'xla' and 'cudnn' (`jax.nn.dot_product_attention`; cuDNN's
fused flash attention on NVIDIA GPUs), and 'auto' (cuDNN where it runs, else 'seqjax'). The
fused ones have no dropout on the weights and return no weights to sow. cuDNN's
`local_window_size` is a sliding window (each query sees the W keys before it), not seqjax's
contiguous blocks (every query of a block sees the same keys), so block-local attention keeps
its own scan on every backend.

Packed rows (several sequences a row, `seqjax.data.packing`) carry segment ids: 0 at padding,
1..k for the row's sequences. `segment_mask` lets a query see only the keys of its own segment,
in self- and cross-attention (a packed target segment attends to the source segment of the same
number). `jax.nn.dot_product_attention` (jax 0.10) takes no segment ids: its XLA path takes
them as a general [B, 1, Q, K] mask; its cuDNN path would turn such a mask into a dense
additive bias (the packed layout cuDNN has, with segment offsets, is not in the public API),
so 'cudnn' refuses packed rows and 'auto' runs seqjax's masked attention for them.

`local_attention` (from `seqjax.nn.local_attention`) splits a length-N sequence into C = N/S
blocks of S positions; the queries of a block see the keys of their own block, of the
`look_back` blocks before it and of the `look_ahead` blocks after it (not causal). Its cost is
O(N * S * (1 + look_back + look_ahead)), i.e. O(N^2 / C) for look_back = look_ahead = 0: no
[N, N] array, not even a mask, is ever built. (`jax.nn.dot_product_attention(
local_window_size=...)` on its XLA path still materialises the [N, N] scores.)
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn import position
from seqjax.nn.local_attention import check_local, local_attention, scale_queries
from seqjax.nn.local_attention import local_window_mask as local_window_mask  # re-exported

Dtype = Any
ATTENTION_KINDS = ("full", "local")
ATTENTION_IMPLS = ("seqjax", "xla", "cudnn", "auto")


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
    return jnp.einsum("...qka,a->...qk", features_BxQxKxA, w_v_A,
                      preferred_element_type=jnp.float32)


def segment_mask(q_segment_ids_BxQ, kv_segment_ids_BxK=None):
    """[B, 1, Q, K] bool: a query sees the keys of its own segment, and no query sees padding
    (segment 0). Self-attention leaves out `kv_segment_ids_BxK`."""
    kv_BxK = q_segment_ids_BxQ if kv_segment_ids_BxK is None else kv_segment_ids_BxK
    return ((q_segment_ids_BxQ[:, None, :, None] == kv_BxK[:, None, None, :])
            & (kv_BxK[:, None, None, :] > 0))


def _key_mask(key_mask_BxK=None, segment_ids=None, kv_segment_ids=None):
    """The [B, 1, Q or 1, K] bool mask of a key-padding mask [B, K] (True = a real token) and
    the `segment_mask` of segment ids, of either or both; None for neither."""
    mask = None if key_mask_BxK is None else key_mask_BxK[:, None, None, :]
    if segment_ids is None:
        return mask
    same = segment_mask(segment_ids, kv_segment_ids)
    return same if mask is None else mask & same


def dot_product_weights(q_BxQxHxD, k_BxKxHxD, mask=None, bias=None):
    """Attention weights [B, H, Q, K] (float32) of scaled dot-product scores; `mask` (bool)
    and `bias` (added to the scores) broadcast to [B, H, Q, K]."""
    scores = jnp.einsum("...qhd,...khd->...hqk", scale_queries(q_BxQxHxD), k_BxKxHxD,
                        preferred_element_type=jnp.float32)
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


def fused_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, *, implementation: str,
                    key_mask_BxK=None, causal: bool = False, segment_ids=None,
                    kv_segment_ids=None):
    """Full attention through `jax.nn.dot_product_attention` ('xla' or 'cudnn'), with a
    key-padding mask [B, K] (True = a real token), causal masking and, on 'xla' only, the
    segment ids of packed rows (`segment_mask`); equal to `dot_product_attention` with the same
    masks. cuDNN takes padding as lengths, so the real keys of a row must come first (as every
    padding mask seqjax builds has them)."""
    if segment_ids is not None and implementation != "xla":
        raise ValueError(f"implementation={implementation!r} takes no segment ids "
                         f"(jax.nn.dot_product_attention's cuDNN path would make a dense "
                         f"bias of them): packed rows need 'xla', 'seqjax' or 'auto'")
    if implementation == "xla":
        mask = _key_mask(key_mask_BxK, segment_ids, kv_segment_ids)
        out = jax.nn.dot_product_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, mask=mask,
                                           is_causal=causal, implementation="xla")
        if mask is None:
            return out
        # A query that sees no key (padding) gets zeros, as in seqjax's own attention.
        return jnp.where(jnp.any(mask, -1)[:, 0, :, None, None], out, 0)
    if implementation != "cudnn":
        raise ValueError(f"implementation={implementation!r}: expected 'xla' or 'cudnn'")
    lengths_B = None if key_mask_BxK is None else jnp.sum(key_mask_BxK, -1, dtype=jnp.int32)
    # A row without keys is zeroed below; cuDNN sees one key there, not an empty softmax whose
    # backward pass could give NaN.
    out = jax.nn.dot_product_attention(
        q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, is_causal=causal, implementation="cudnn",
        key_value_seq_lengths=None if lengths_B is None else jnp.maximum(lengths_B, 1))
    if lengths_B is None:
        return out
    return jnp.where(lengths_B[:, None, None, None] > 0, out, 0)


def cudnn_runs(dtype, head_dim: int) -> bool:
    """Whether cuDNN's flash attention takes these inputs here: an NVIDIA GPU, half-precision
    inputs and a head dimension it supports."""
    return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128)


def check_impl(implementation: str, dropout_rate: float = 0.0):
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={implementation!r}: expected one of {ATTENTION_IMPLS}")
    if implementation in ("xla", "cudnn") and dropout_rate > 0:
        raise ValueError(f"attention_impl={implementation!r} has no dropout on the attention "
                         f"weights (attention dropout {dropout_rate}): use 'seqjax' or 'auto'")


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
    `block_size`, `look_back` and `look_ahead` (not with `causal` or `decode`). `causal` masks
    later keys; `mask` is a key-padding mask [B, K] (True = a real token). `rotary` applies
    rotary position embeddings to q and k, at `positions` [B, Q] when given (packed rows), else
    at 0..Q-1. `segment_ids` [B, Q] (and `kv_segment_ids` [B, K] in cross-attention) keep the
    sequences of packed rows apart (`segment_mask`); training only, not with `decode`.
    `attention_impl` picks full attention's implementation (see the module docstring); a call
    with 'intermediates' mutable (an analysis asking for the weights) runs seqjax's own.

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
    look_ahead: int = 0
    causal: bool = False
    rotary: bool = False
    dropout_rate: float = 0.0
    decode: bool = False
    use_bias: bool = True
    attention_impl: str = "seqjax"
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, inputs_q, inputs_kv=None, *, mask=None, segment_ids=None,
                 kv_segment_ids=None, positions=None, deterministic: bool = True):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r}: expected one of {ATTENTION_KINDS}")
        check_impl(self.attention_impl, self.dropout_rate)
        local = self.attention == "local"
        if local:
            if self.decode and self.look_ahead:
                raise ValueError(f"look_ahead={self.look_ahead} with decode=True: a key/value "
                                 f"cache decodes causally, one position after another, so no "
                                 f"query sees a later block")
            check_local(self.block_size, self.look_back, self.look_ahead, self.causal)
        features = self.qkv_features or inputs_q.shape[-1]
        if features % self.num_heads:
            raise ValueError(f"qkv_features={features} is not divisible by "
                             f"num_heads={self.num_heads}")
        if inputs_kv is not None and (local or self.causal or self.rotary or self.decode):
            raise ValueError("local, causal, rotary and decode attention are for "
                             "self-attention only")
        if self.decode and not self.causal:
            raise ValueError("decode=True (a key/value cache) needs causal=True")
        if (segment_ids is None) != (kv_segment_ids is None) and inputs_kv is not None:
            raise ValueError("packed cross-attention needs the segment ids of both the queries "
                             "(segment_ids) and the keys (kv_segment_ids)")
        if self.decode and segment_ids is not None:
            raise ValueError("segment_ids are for training on packed rows; decode=True reads "
                             "one sequence a row")
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
                positions = jnp.arange(q.shape[1]) if positions is None else positions
                q, k = position.rotary(q, positions), position.rotary(k, positions)
            if self.decode:  # init: the cache for inputs of this length
                self.variable("cache", "cached_key", jnp.zeros_like, k)
                self.variable("cache", "cached_value", jnp.zeros_like, v)
                self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            if local:
                out = local_attention(q, k, v, block_size=self.block_size, causal=self.causal,
                                      look_back=self.look_back,
                                      look_ahead=self.look_ahead, mask=mask,
                                      segment_ids=segment_ids, dropout_rate=self.dropout_rate,
                                      dropout_rng=dropout_rng)
            elif (impl := self._full_impl(q.dtype, q.shape[-1], segment_ids)) != "seqjax":
                out = fused_attention(q, k, v, implementation=impl, key_mask_BxK=mask,
                                      causal=self.causal, segment_ids=segment_ids,
                                      kv_segment_ids=kv_segment_ids)
            else:
                full_mask = _key_mask(mask, segment_ids, kv_segment_ids)
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

    def _full_impl(self, dtype, head_dim: int, segment_ids) -> str:
        if self.is_mutable_collection("intermediates"):
            return "seqjax"
        if self.attention_impl == "auto":
            cudnn = self.dropout_rate == 0 and segment_ids is None and cudnn_runs(dtype, head_dim)
            return "cudnn" if cudnn else "seqjax"
        return self.attention_impl

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
