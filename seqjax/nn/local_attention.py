"""Block-local self-attention: a length-N sequence in C = N/S blocks of S positions, the queries
of a block seeing the keys of their own block, of the `look_back` blocks before it and of the
`look_ahead` blocks after it, at O(N * S * (1 + look_back + look_ahead)) cost with no [N, N]
array, not even a mask. It runs as a `lax.scan` over steps of blocks with FlashAttention's
backward (a hand-written VJP that keeps q, k, v and one log-sum-exp per query and recomputes a
step's weights). `seqjax.nn.attention` re-exports it.

Dimension letters: B batch, N length, H heads, D head dimension, C number of blocks, S block
size, W window (keys a block's queries see: (1 + look_back + look_ahead) * S), G blocks per
scan step.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NEG = np.float32(-1e30)  # a finite -inf: exp(NEG - max) is 0, and no inf - inf


def scale_queries(q, dtype=None):
    """q / sqrt(D), the scaling of scaled dot-product attention."""
    return q * jnp.asarray(1.0 / np.sqrt(q.shape[-1]), dtype or q.dtype)


def _check_int(name, value, low):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


def check_local(block_size, look_back, look_ahead=0, causal=False):
    _check_int("block_size", block_size, 1)
    _check_int("look_back", look_back, 0)
    _check_int("look_ahead", look_ahead, 0)
    if causal and look_ahead:
        raise ValueError(f"look_ahead={look_ahead} with causal=True: a causal query sees no "
                         f"later key, so no block after its own (use look_ahead=0)")


def local_window_mask(length: int, block_size: int, look_back: int = 0, causal: bool = False,
                      look_ahead: int = 0):
    """The [N, N] mask that `local_attention` applies without building it: query i may see key
    j iff j's block is i's block, one of the `look_back` before it or one of the `look_ahead`
    after it (and j <= i if causal). A reference for tests and plots."""
    check_local(block_size, look_back, look_ahead, causal)
    block = np.arange(length) // block_size
    allowed = ((block[None, :] <= block[:, None] + look_ahead)
               & (block[None, :] >= block[:, None] - look_back))
    if causal:
        allowed &= np.arange(length)[None, :] <= np.arange(length)[:, None]
    return allowed


STEP_SCORES = 2 ** 20  # scores a scan step of local_attention computes by default (4 MiB)


def local_attention(q_BxNxHxD, k_BxNxHxD, v_BxNxHxD, *, block_size: int, causal: bool = False,
                    look_back: int = 0, look_ahead: int = 0, mask=None, segment_ids=None,
                    dropout_rate: float = 0.0, dropout_rng=None,
                    blocks_per_step: Optional[int] = None):
    """Block-local self-attention: [B, N, H, D].

    Positions are split into contiguous blocks of `block_size`; a query attends to the keys of
    its own block, of the `look_back` blocks before it and of the `look_ahead` blocks after it
    (refused with `causal`, which keeps it to keys <= itself), and only to real tokens if `mask`
    ([B, N], True = a real token) is given. `segment_ids` [B, N] (packed rows: 0 at padding,
    1..k for the row's sequences) keep a query to the keys of its own segment, compared block
    by block inside the scan. A length that is not a multiple of `block_size` is padded
    internally and the result trimmed.

    A `lax.scan` runs over steps of `blocks_per_step` blocks (by default as many as keep a
    step's scores within STEP_SCORES, so that a step works in cache), carrying the keys and
    values of the look_back + look_ahead blocks before the step's keys, which are look_ahead
    blocks after its queries (`_keys_ahead`). The backward pass is FlashAttention's: it keeps
    q, k, v and each query's log-sum-exp of scores and recomputes a step's weights, so no
    [N, W] array is ever stored. Forward-mode differentiation is not defined.
    """
    check_local(block_size, look_back, look_ahead, causal)
    if blocks_per_step is not None:
        _check_int("blocks_per_step", blocks_per_step, 1)
    if not (q_BxNxHxD.shape[:2] == k_BxNxHxD.shape[:2] == v_BxNxHxD.shape[:2]):
        raise ValueError(f"local_attention is self-attention: q, k, v must share [batch, length], "
                         f"got {q_BxNxHxD.shape}, {k_BxNxHxD.shape}, {v_BxNxHxD.shape}")
    B, N, H, _ = q_BxNxHxD.shape
    S, C = block_size, -(-N // block_size)
    look_ahead = min(look_ahead, C - 1)  # blocks past the last are padding
    W = (1 + look_back + look_ahead) * S
    G = min(C, blocks_per_step or max(1, STEP_SCORES // (B * H * S * W)))
    steps = -(-C // G)
    G = -(-C // steps)  # the fewest blocks per step for this many steps: the least padding
    P = steps * G * S - N

    def in_steps(x):  # [B, N, ...] -> [steps, B, G, S, ...]: no copy when B = 1 and P = 0
        x = jnp.pad(x, [(0, 0), (0, P)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((B, steps, G, S) + x.shape[2:]), 1, 0)

    key_ok_BxN = jnp.ones((B, N), bool) if mask is None else jnp.broadcast_to(
        jnp.asarray(mask, bool), (B, N))
    if segment_ids is not None:
        segment_ids = jnp.broadcast_to(jnp.asarray(segment_ids, jnp.int32), (B, N))
        key_ok_BxN = key_ok_BxN & (segment_ids > 0)
        segment_ids = in_steps(segment_ids)
    rate = float(dropout_rate) if dropout_rng is not None else 0.0
    config = _Local(S, G, look_back, look_ahead, bool(causal), rate)
    out = _local(in_steps(q_BxNxHxD), in_steps(k_BxNxHxD), in_steps(v_BxNxHxD),
                 in_steps(key_ok_BxN), segment_ids, dropout_rng if rate else None, config)
    out = jnp.moveaxis(out, 0, 1)  # [B, steps, G, S, H, D]
    return out.reshape((B, steps * G * S) + out.shape[4:])[:, :N]


class _Local(NamedTuple):
    block_size: int
    blocks_per_step: int
    look_back: int
    look_ahead: int
    causal: bool
    dropout_rate: float

    @property
    def carried(self) -> int:
        """Blocks of keys a step carries from the one before: look_back + look_ahead."""
        return self.look_back + self.look_ahead


def _windows(x, before, config: _Local, axis: int):
    """This step's key blocks x ([..., G, S, ...], the blocks on `axis`, look_ahead blocks after
    the step's query blocks) and the L = look_back + look_ahead blocks `before` them -> each
    query block's window ([..., G, W, ...]: the look_back blocks before it, itself, the
    look_ahead blocks after it) and the L blocks before the next step's keys."""
    G, L = config.blocks_per_step, config.carried
    if L == 0:
        return x, before
    every = jnp.concatenate([before, x], axis=axis)
    part = lambda start, size: lax.slice_in_dim(every, start, start + size, axis=axis)
    return jnp.concatenate([part(j, G) for j in range(L + 1)], axis=axis + 1), part(G, L)


def _window_sums(d_BxHxGxWxD, config: _Local):
    """The transpose of gathering windows: [B, H, G, W, D] gradients -> [B, H, L + G, S, D]
    (L = look_back + look_ahead), summed over the windows each block is part of."""
    L, S = config.carried, config.block_size
    parts = d_BxHxGxWxD.reshape(d_BxHxGxWxD.shape[:3] + (L + 1, S) + d_BxHxGxWxD.shape[4:])
    return sum(jnp.pad(parts[:, :, :, j], [(0, 0), (0, 0), (j, L - j), (0, 0), (0, 0)])
               for j in range(L + 1))


def _step_scores(q_BxHxGxSxD, before, k, v, key_ok, segment_ids, key_segments,
                 config: _Local):
    """The scaled, masked float32 scores [B, H, G, S, W] of one step (k, v, key_ok and
    key_segments from `_keys_ahead`; segment_ids the queries'), its value windows and the
    look_back + look_ahead blocks of keys, values, key mask and key segment ids (None when
    there are none) before the next step's."""
    k_window, k_next = _windows(k, before[0], config, axis=2)
    v_window, v_next = _windows(v, before[1], config, axis=2)
    ok_window, ok_next = _windows(key_ok, before[2], config, axis=1)
    S, W = config.block_size, (1 + config.carried) * config.block_size
    scores = jnp.einsum("bhgqd,bhgkd->bhgqk", q_BxHxGxSxD, k_window,
                        preferred_element_type=jnp.float32)
    scores += jnp.where(ok_window, 0.0, NEG)[:, None, :, None, :]  # [B, 1, G, 1, W]
    segments_next = None
    if segment_ids is not None:  # this step's queries [B, G, S] against their windows' keys
        segments_window, segments_next = _windows(key_segments, before[3], config, axis=1)
        same_BxGxSxW = segment_ids[..., None] == segments_window[:, :, None, :]
        scores += jnp.where(same_BxGxSxW, 0.0, NEG)[:, None]
    if config.causal:  # key offset in the window <= query offset + the look_back blocks
        scores += np.where(np.arange(W)[None, :] > np.arange(S)[:, None] + W - S, NEG, 0.0)
    return scores, k_window, v_window, (k_next, v_next, ok_next, segments_next)


def _head_major(x_BxGxSxHxD):
    """[B, G, S, H, D] -> [B, H, G, S, D], where both einsums of a step are plain batched
    matmuls. Done step by step inside the scan, on data in cache."""
    return jnp.transpose(x_BxGxSxHxD, (0, 3, 1, 2, 4))


def _position_major(x_BxHxGxSxD):
    return jnp.transpose(x_BxHxGxSxD, (0, 2, 3, 1, 4))


def _keys_ahead(k, v, key_ok, segment_ids, config: _Local):
    """The key side of the scan from k, v, key_ok and segment_ids laid out in steps (segment_ids
    may be None): the four moved look_ahead blocks earlier, so that a step's keys are look_ahead
    blocks after its queries (blocks of zeros after the end, masked out), and the carry of the
    first step: look_back blocks of zeros, masked out (segment 0), then the first look_ahead
    blocks (head-major)."""
    A = config.look_ahead

    def ahead(x):
        if x is None:
            return None, None
        steps, B, G = x.shape[:3]
        first = jnp.zeros((B, config.look_back) + x.shape[3:], x.dtype)
        if A:
            blocks = jnp.moveaxis(x, 0, 1).reshape((B, steps * G) + x.shape[3:])
            first = jnp.concatenate([first, blocks[:, :A]], axis=1)
            blocks = jnp.pad(blocks[:, A:], [(0, 0), (0, A)] + [(0, 0)] * (x.ndim - 3))
            x = jnp.moveaxis(blocks.reshape((B, steps, G) + x.shape[3:]), 1, 0)
        return x, first if x.ndim == 4 else _head_major(first)

    return tuple(zip(*(ahead(x) for x in (k, v, key_ok, segment_ids))))


def _keep(dropout_rng, step, shape, rate):
    """Dropout's keep mask of a step, scaled by 1 / (1 - rate); the backward draws it again."""
    keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, step), 1.0 - rate, shape)
    return keep / (1.0 - rate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _local(q, k, v, key_ok, segment_ids, dropout_rng, config: _Local):
    """local_attention on inputs laid out in steps, [steps, B, G, S, H, D] ([steps, B, G, S]
    for key_ok and segment_ids, which may be None): the output in the same layout."""
    return _local_fwd(q, k, v, key_ok, segment_ids, dropout_rng, config)[0]


def _local_fwd(q, k, v, key_ok, segment_ids, dropout_rng, config: _Local):
    def step(before, inputs):
        i, q_step, k_step, v_step, ok_step, segments_step, k_segments_step = inputs
        q_step, k_step, v_step = (_head_major(x) for x in (q_step, k_step, v_step))
        scores, _, v_window, before = _step_scores(scale_queries(q_step), before, k_step, v_step,
                                                   ok_step, segments_step, k_segments_step,
                                                   config)
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

    (k_ahead, v_ahead, ok_ahead, segments_ahead), first = _keys_ahead(k, v, key_ok, segment_ids,
                                                                      config)
    _, (out, log_sum_exp) = lax.scan(step, first, (jnp.arange(q.shape[0]), q, k_ahead, v_ahead,
                                                   ok_ahead, segment_ids, segments_ahead))
    return out, (q, k, v, key_ok, segment_ids, dropout_rng, log_sum_exp)


def _local_bwd(config: _Local, residuals, d_out):
    q, k, v, key_ok, segment_ids, dropout_rng, log_sum_exp = residuals
    G, L = config.blocks_per_step, config.carried

    def step(carry, inputs):
        before, (dk_sum, dv_sum) = carry
        (i, q_step, k_step, v_step, ok_step, segments_step, k_segments_step, d_out_step,
         lse_step) = inputs
        q_step, k_step, v_step, d_out_step = (_head_major(x) for x in (q_step, k_step, v_step,
                                                                        d_out_step))
        q_step = scale_queries(q_step)
        scores, k_window, v_window, before = _step_scores(q_step, before, k_step, v_step,
                                                          ok_step, segments_step,
                                                          k_segments_step, config)
        weights = jnp.exp(scores - lse_step[..., None])
        d_weights = jnp.einsum("bhgqd,bhgkd->bhgqk", d_out_step, v_window,
                               preferred_element_type=jnp.float32)
        dropped = weights
        if config.dropout_rate:
            keep = _keep(dropout_rng, i, weights.shape, config.dropout_rate)
            dropped, d_weights = weights * keep, d_weights * keep
        d_scores = weights * (d_weights - jnp.sum(weights * d_weights, axis=-1, keepdims=True))
        dq = scale_queries(jnp.einsum("bhgqk,bhgkd->bhgqd", d_scores.astype(k.dtype), k_window,
                                preferred_element_type=jnp.float32))  # dq has q's D
        dk = jnp.einsum("bhgqk,bhgqd->bhgkd", d_scores.astype(q.dtype), q_step,
                        preferred_element_type=jnp.float32)
        dv = jnp.einsum("bhgqk,bhgqd->bhgkd", dropped.astype(v.dtype), d_out_step,
                        preferred_element_type=jnp.float32)
        if L:  # dk_sum, dv_sum: [B, H, L + G, S, D], key blocks from look_back before the
            # step's queries on
            dk_sum, dv_sum = dk_sum + _window_sums(dk, config), dv_sum + _window_sums(dv, config)
            dk, dv = dk_sum[:, :, :G], dv_sum[:, :, :G]  # done: no later window holds them
            shift = lambda x: jnp.pad(x[:, :, G:], [(0, 0), (0, 0), (0, G), (0, 0), (0, 0)])
            dk_sum, dv_sum = shift(dk_sum), shift(dv_sum)
        return (before, (dk_sum, dv_sum)), tuple(_position_major(d.astype(x.dtype))
                                                 for d, x in ((dq, q), (dk, k), (dv, v)))

    steps, B, _, S, H, _ = q.shape
    sums = tuple(jnp.zeros((B, H, L + G, S, x.shape[-1]), jnp.float32) for x in (k, v))
    (k_ahead, v_ahead, ok_ahead, segments_ahead), first = _keys_ahead(k, v, key_ok, segment_ids,
                                                                      config)
    (_, sums), (dq, dk, dv) = lax.scan(step, (first, sums), (
        jnp.arange(steps), q, k_ahead, v_ahead, ok_ahead, segment_ids, segments_ahead, d_out,
        log_sum_exp))
    if L:  # a step emits the key blocks from look_back before its queries: blocks
        # -look_back .. steps*G - look_back, then the rest up to steps*G + look_ahead
        def realign(d, d_sum):  # d [steps, B, G, S, H, D]; d_sum [B, H, L + G, S, D]
            blocks = jnp.moveaxis(d, 0, 1).reshape((B, steps * G) + d.shape[3:])
            rest = _position_major(d_sum[:, :, :L]).astype(d.dtype)
            blocks = jnp.concatenate([blocks, rest], axis=1)
            blocks = blocks[:, config.look_back:config.look_back + steps * G]
            return jnp.moveaxis(blocks.reshape((B, steps, G) + d.shape[3:]), 1, 0)
        dk, dv = realign(dk, sums[0]), realign(dv, sums[1])
    return dq, dk, dv, None, None, None


_local.defvjp(_local_fwd, _local_bwd)
