"""seqjax.nn.attention against naive references: NumPy loops over queries of the textbook's
masked softmax, additive and scaled dot-product attention; block-local attention against full
attention under the band mask built by hand in NumPy (values and gradients); Flax's
MultiHeadDotProductAttention on copied weights; cached decoding against the whole sequence at
once; plus properties: causality and locality read off Jacobians, zeros (never NaN) for queries
with no key, clear errors for bad inputs, jit equals no-jit.

As in test_recurrent.py, compilation is nearly all of the time, so these tests compile little:
parameters are random arrays shaped by `jax.eval_shape(model.init)`, inputs are NumPy (indexing
a jax array eagerly compiles an op), functions run under jit, and the full-attention reference
of the local cases runs at one padded shape.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

from seqjax.nn.attention import (
    AdditiveAttention,
    MultiHeadAttention,
    additive_scores,
    dot_product_attention,
    local_attention,
    local_window_mask,
    masked_softmax,
)


def normal(rng, *shape):
    """float32 NumPy: references index it freely, where indexing a jax array eagerly would
    compile an op per index."""
    return rng.normal(size=shape).astype(np.float32)


def random_params(model, rng, *args, **kwargs):
    """Variables shaped like model.init's, filled with N(0, 0.5^2): nonzero biases included.
    Any 'cache' (decode=True) is zeros, as init makes it."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs)
    params = jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(s.dtype),
                          shapes["params"])
    variables = {"params": params}
    if "cache" in shapes:
        variables["cache"] = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["cache"])
    return variables


def assert_tree_close(a, b, **kw):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw), a, b)


# ----------------------------------------------------------------------------- NumPy references

def np_masked_softmax(scores, keep):
    """Softmax of a 1-D array of scores over the entries where `keep` is True, zeros elsewhere;
    all zeros when nothing is kept. float64."""
    scores, keep = np.asarray(scores, np.float64), np.asarray(keep, bool)
    out = np.zeros_like(scores)
    if keep.any():
        e = np.exp(scores[keep] - scores[keep].max())
        out[keep] = e / e.sum()
    return out


def np_band_mask(length, block_size, look_back, causal, look_ahead=0):
    """[N, N], entry by entry: query i sees key j iff j's block is i's, one of the look_back
    blocks before it or one of the look_ahead blocks after it, and j <= i if causal."""
    allowed = np.zeros((length, length), bool)
    for i in range(length):
        for j in range(length):
            block_i, block_j = i // block_size, j // block_size
            allowed[i, j] = ((block_i - look_back <= block_j <= block_i + look_ahead)
                             and (not causal or j <= i))
    return allowed


def np_dot_product_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, mask_BxHxQxK, bias_BxHxQxK=0.0):
    """A loop over examples, heads and queries: scores q.k_j/sqrt(D) (+ bias) for every key,
    the masked softmax, the weighted sum of the values."""
    q, k, v = (np.asarray(a, np.float64) for a in (q_BxQxHxD, k_BxKxHxD, v_BxKxHxD))
    B, Q, H, D = q.shape
    K = k.shape[1]
    mask = np.broadcast_to(mask_BxHxQxK, (B, H, Q, K))
    bias = np.broadcast_to(np.asarray(bias_BxHxQxK, np.float64), (B, H, Q, K))
    out = np.zeros((B, Q, H, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            for i in range(Q):
                scores = [q[b, i, h] @ k[b, j, h] / np.sqrt(D) + bias[b, h, i, j]
                          for j in range(K)]
                weights = np_masked_softmax(scores, mask[b, h, i])
                out[b, i, h] = sum(weights[j] * v[b, j, h] for j in range(K))
    return out


# ----------------------------------------------------------------------------- masked softmax

def test_masked_softmax_matches_numpy():
    rng = np.random.default_rng(0)
    B, Q, K = 3, 4, 5
    scores = 3 * normal(rng, B, Q, K)
    lens_B = np.array([5, 2, 0])
    lens_BxQ = np.array([[1, 5, 0, 3], [0, 0, 2, 4], [5, 5, 1, 0]])
    softmax = jax.jit(masked_softmax)
    for lens in (lens_B, lens_BxQ):
        weights = np.asarray(softmax(scores, lens))
        assert weights.shape == (B, Q, K) and np.all(np.isfinite(weights))
        row_lens_BxQ = np.broadcast_to(lens.reshape(B, -1), (B, Q))
        for b in range(B):
            for i in range(Q):
                ref = np_masked_softmax(scores[b, i], np.arange(K) < row_lens_BxQ[b, i])
                np.testing.assert_allclose(weights[b, i], ref, atol=1e-6)
        # No key: all zeros (not uniform, not NaN).
        assert (row_lens_BxQ == 0).any()
        np.testing.assert_array_equal(weights[row_lens_BxQ == 0], 0.0)
    # No valid_lens: the plain softmax.
    np.testing.assert_allclose(
        softmax(scores, None),
        [[np_masked_softmax(row, np.ones(K, bool)) for row in rows] for rows in scores],
        atol=1e-6)


def test_masked_softmax_bad_valid_lens_shape():
    scores = np.zeros((2, 3, 4), np.float32)
    for bad in (np.ones(3, int), np.ones((2, 4), int), np.ones((2, 3, 4), int),
                np.ones((3, 2), int)):
        with pytest.raises(ValueError, match=r"valid_lens of shape .* prefix of scores.shape"):
            masked_softmax(scores, bad)


# ----------------------------------------------------------------------------- additive, dot

def test_additive_attention_matches_numpy_loop():
    """AdditiveAttention (and `additive_scores`) against a loop over queries: for each key
    w_v . tanh(W_q q + W_k k_j), the masked softmax over the first valid_lens keys, the
    weighted sum of the values. Queries, keys and values of different sizes."""
    rng = np.random.default_rng(1)
    B, Q, K, Dq, Dk, Dv, A = 3, 2, 5, 3, 4, 6, 7
    queries, keys, values = normal(rng, B, Q, Dq), normal(rng, B, K, Dk), normal(rng, B, K, Dv)
    model = AdditiveAttention(A)
    variables = random_params(model, rng, queries, keys, values)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    assert p["w_v"].shape == (A, 1)
    apply = jax.jit(lambda v, lens: model.apply(v, queries, keys, values, lens,
                                                mutable="intermediates"))
    for lens in (np.array([5, 2, 0]), np.array([[1, 0], [5, 3], [4, 2]])):
        out, state = apply(variables, lens)
        lens_BxQ = np.broadcast_to(lens.reshape(B, -1), (B, Q))
        ref = np.zeros((B, Q, Dv))
        ref_weights = np.zeros((B, Q, K))
        for b in range(B):
            for i in range(Q):
                q = queries[b, i] @ p["W_q"]["kernel"]
                scores = [np.tanh(q + keys[b, j] @ p["W_k"]["kernel"]) @ p["w_v"][:, 0]
                          for j in range(K)]
                ref_weights[b, i] = np_masked_softmax(scores, np.arange(K) < lens_BxQ[b, i])
                ref[b, i] = sum(ref_weights[b, i, j] * values[b, j] for j in range(K))
        np.testing.assert_allclose(out, ref, atol=1e-5)
        weights, = state["intermediates"]["attention_weights"]
        np.testing.assert_allclose(weights, ref_weights, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(out)[lens_BxQ == 0], 0.0)

    # The score function alone, on already projected queries and keys.
    q, k, w_v = normal(rng, B, Q, A), normal(rng, B, K, A), normal(rng, A)
    ref_scores = np.array([[[np.tanh(q[b, i] + k[b, j]) @ w_v for j in range(K)]
                            for i in range(Q)] for b in range(B)])
    np.testing.assert_allclose(jax.jit(additive_scores)(q, k, w_v), ref_scores, atol=1e-5)


def test_dot_product_attention_matches_numpy_loop():
    rng = np.random.default_rng(2)
    B, Q, K, H, D = 2, 3, 5, 2, 4
    q, k, v = normal(rng, B, Q, H, D), normal(rng, B, K, H, D), normal(rng, B, K, H, D)
    mask = rng.random((B, H, Q, K)) < 0.6
    mask[1, 0, 2] = False  # a query with no key
    bias = normal(rng, B, 1, Q, K)
    attend = jax.jit(dot_product_attention)
    out = np.asarray(attend(q, k, v, mask, bias))
    np.testing.assert_allclose(out, np_dot_product_attention(q, k, v, mask, bias), atol=1e-5)
    np.testing.assert_array_equal(out[1, 2, 0], 0.0)
    # A key-padding mask broadcast as [B, 1, 1, K], and no mask at all.
    pad_BxK = np.arange(K)[None] < np.array([[4], [1]])
    np.testing.assert_allclose(attend(q, k, v, pad_BxK[:, None, None]),
                               np_dot_product_attention(q, k, v, pad_BxK[:, None, None]),
                               atol=1e-5)
    np.testing.assert_allclose(dot_product_attention(q[:1, :1], k[:1], v[:1]),
                               np_dot_product_attention(q[:1, :1], k[:1], v[:1], True),
                               atol=1e-5)


# ----------------------------------------------------------------------------- local vs full

@pytest.mark.parametrize("length,block_size", [(1, 1), (5, 2), (9, 4), (12, 4), (16, 3),
                                               (4, 7)])
def test_local_window_mask_matches_numpy_loop(length, block_size):
    for look_back in (0, 1, 2):
        for causal in (False, True):
            np.testing.assert_array_equal(
                local_window_mask(length, block_size, look_back, causal),
                np_band_mask(length, block_size, look_back, causal))
        for look_ahead in (1, 2):
            np.testing.assert_array_equal(
                local_window_mask(length, block_size, look_back, look_ahead=look_ahead),
                np_band_mask(length, block_size, look_back, False, look_ahead))


LOCAL_CASES = [  # (N, S, look_back, look_ahead, causal, key padding, blocks_per_step)
    (7, 3, 0, 0, False, True, None),  # N not a multiple of S
    (7, 3, 1, 0, True, True, 1),      # a scan step per block
    (10, 4, 2, 0, True, True, 1),     # look_back above the blocks of a step
    (11, 2, 1, 0, False, False, 2),   # 6 blocks in 3 steps of 2
    (9, 2, 1, 0, True, True, 2),      # 5 blocks in 3 steps of 2: a padding block
    (12, 4, 1, 0, True, True, None),  # a multiple of S
    (5, 8, 0, 0, True, True, None),   # S > N: one block, i.e. full attention
    (5, 8, 1, 0, False, True, None),
    (5, 8, 1, 2, False, True, None),  # look_ahead past the last block
    (7, 3, 0, 2, False, False, None),
] + [  # every look_back x look_ahead, with and without padding, 1 and 2 blocks a step:
    # padded, N = 9 in 5 blocks of 2 (3 steps of 2: a padding block); else N = 10 in 4 of 3
    (9, 2, back, ahead, False, True, 1 + (back + ahead) % 2) if padded else
    (10, 3, back, ahead, False, False, 2 - (back + ahead) % 2)
    for back in (0, 1, 2) for ahead in (0, 1, 2) for padded in (True, False)]
REF_B, REF_N, REF_H, REF_D, REF_DV = 3, 12, 2, 3, 4  # each case padded to this: one reference


@jax.jit
def full_attention_and_vjp(q, k, v, mask_BxHxNxN, cotangent):
    out, vjp = jax.vjp(lambda q, k, v: dot_product_attention(q, k, v, mask_BxHxNxN), q, k, v)
    return out, vjp(cotangent)


@pytest.mark.parametrize("N,S,look_back,look_ahead,causal,padded,blocks_per_step", LOCAL_CASES)
def test_local_attention_equals_full_attention_with_band_mask(N, S, look_back, look_ahead, causal,
                                                              padded, blocks_per_step):
    """Values and gradients wrt q, k and v, against `dot_product_attention` under the band
    mask of `np_band_mask` and the key padding, with values of another head dimension than the
    queries'. Example 1 has its first 1 + look_ahead blocks padded and example 2 a random
    padding, so some queries see no key at all: their outputs are exactly zero and every
    gradient is finite.

    The reference runs at length REF_N, positions N.. masked out as keys and given a zero
    cotangent as queries (which changes nothing at positions < N), so it compiles once."""
    rng = np.random.default_rng(N * 1000 + S * 100 + look_back * 10 + look_ahead)
    q, k = normal(rng, REF_B, REF_N, REF_H, REF_D), normal(rng, REF_B, REF_N, REF_H, REF_D)
    v, cotangent = (normal(rng, REF_B, REF_N, REF_H, REF_DV) for _ in range(2))
    cotangent[:, N:] = 0
    key_ok_BxN = np.ones((REF_B, N), bool)
    if padded:
        key_ok_BxN[1, :S * (1 + look_ahead)] = False
        key_ok_BxN[2] = rng.random(N) < 0.6
    allowed_BxNxN = (np_band_mask(N, S, look_back, causal, look_ahead)[None]
                     & key_ok_BxN[:, None, :])

    @jax.jit
    def local_and_vjp(q, k, v, mask, cotangent):
        out, vjp = jax.vjp(lambda q, k, v: local_attention(
            q, k, v, block_size=S, causal=causal, look_back=look_back, look_ahead=look_ahead,
            mask=mask, blocks_per_step=blocks_per_step), q, k, v)
        return out, vjp(cotangent)

    out, grads = local_and_vjp(q[:, :N], k[:, :N], v[:, :N], key_ok_BxN if padded else None,
                               cotangent[:, :N])
    allowed_padded = np.zeros((REF_B, 1, REF_N, REF_N), bool)
    allowed_padded[:, 0, :N, :N] = allowed_BxNxN
    ref_out, ref_grads = full_attention_and_vjp(q, k, v, allowed_padded, cotangent)
    out, grads = np.asarray(out), [np.asarray(g) for g in grads]
    assert out.shape == (REF_B, N, REF_H, REF_DV)
    np.testing.assert_allclose(out, np.asarray(ref_out)[:, :N], atol=1e-5)
    np.testing.assert_allclose(out, np_dot_product_attention(
        q[:, :N], k[:, :N], v[:, :N], allowed_BxNxN[:, None]), atol=1e-5)
    assert all(np.all(np.isfinite(g)) for g in grads)
    for g, ref_g in zip(grads, ref_grads):
        np.testing.assert_allclose(g, np.asarray(ref_g)[:, :N], atol=1e-5)
        assert np.any(g != 0)

    no_key_BxN = ~allowed_BxNxN.any(-1)
    assert no_key_BxN.any() == padded  # the case has queries with nothing to attend to
    np.testing.assert_array_equal(out[no_key_BxN], 0.0)
    np.testing.assert_array_equal(grads[0][no_key_BxN], 0.0)


def test_local_attention_dropout_drops_weights_and_its_gradient_is_exact():
    """Values one-hot in the key position make the output the weights themselves. With
    dropout, each weight is 0 or the weight without dropout / (1 - rate), and about `rate` of
    those a query may see are 0. The backward draws the forward's masks again: its gradients
    agree with finite differences."""
    rng = np.random.default_rng(11)
    B, N, H, S, look_back, rate = 2, 24, 2, 4, 1, 0.3
    q, k = normal(rng, B, N, H, 3), normal(rng, B, N, H, 3)
    one_hot = np.broadcast_to(np.eye(N, dtype=np.float32)[None, :, None, :], (B, N, H, N))
    kwargs = dict(block_size=S, look_back=look_back, causal=True, blocks_per_step=2,
                  dropout_rate=rate)
    attend = jax.jit(lambda q, k, v, rng: local_attention(q, k, v, dropout_rng=rng, **kwargs))
    weights = np.asarray(jax.jit(lambda q, k, v: local_attention(q, k, v, **kwargs))(
        q, k, one_hot))  # no dropout_rng: no dropout
    dropped = np.asarray(attend(q, k, one_hot, jax.random.key(0)))
    allowed = np.broadcast_to(np_band_mask(N, S, look_back, True)[None, :, None, :], weights.shape)
    np.testing.assert_array_equal(weights[~allowed], 0.0)
    assert np.all(weights[allowed] > 0)
    kept = dropped != 0
    np.testing.assert_allclose(dropped[kept], weights[kept] / (1 - rate), rtol=1e-5)
    assert not np.any(kept & ~allowed)
    assert abs(1 - kept[allowed].mean() - rate) < 0.06, kept[allowed].mean()

    # <vjp(c), u> against d/de <out(x + e u), c> at e = 0, by central differences
    x = (q, k, normal(rng, B, N, H, 3))
    u = [normal(rng, B, N, H, 3) for _ in x]
    cotangent, eps = normal(rng, B, N, H, 3), 1e-2
    f = lambda *x: attend(*x, jax.random.key(1))
    _, vjp = jax.vjp(f, *x)
    shifted = lambda sign: np.vdot(f(*(a + sign * eps * b for a, b in zip(x, u))), cotangent)
    np.testing.assert_allclose((shifted(1) - shifted(-1)) / (2 * eps),
                               sum(np.vdot(g, b) for g, b in zip(vjp(cotangent), u)), rtol=1e-2)


@pytest.mark.parametrize("look_ahead,causal", [(0, True), (1, False)])
def test_local_attention_never_stores_an_N_by_W_array(look_ahead, causal):
    """XLA's compiled temporaries of the forward and of the forward+backward at N = 131072,
    S = 128, look_back 1 stay under half of one [N, 2 S] float32 array (128 MiB), also with
    look_ahead 1 (W = 3 S): a scan step computes at most STEP_SCORES scores and the backward
    recomputes them. Compiled, not run."""
    N, S = 131072, 128
    x = jax.ShapeDtypeStruct((1, N, 1, 4), np.float32)
    forward = lambda q, k, v: local_attention(q, k, v, block_size=S, look_back=1,
                                              look_ahead=look_ahead, causal=causal)
    grad = jax.grad(lambda q, k, v: forward(q, k, v).sum(), argnums=(0, 1, 2))
    for fn in (forward, grad):
        temp = jax.jit(fn).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
        assert temp < N * 2 * S * 4 / 2, temp


# ----------------------------------------------------------------------------- causality

def dependence_NxN(jacobian):
    """[N, N] from the Jacobian of outputs [1, N, ...] wrt inputs of the same shape: True where
    output position t depends on input position s at all."""
    n, half = jacobian.shape[1], jacobian.ndim // 2
    J = np.abs(np.asarray(jacobian)).reshape(n, -1, n, np.prod(jacobian.shape[half + 2:]))
    return J.sum(axis=(1, 3)) > 0


def test_local_attention_gradient_is_causal_and_local():
    """d out[t] / d v[s] is exactly zero outside the band (s > t, or s before the look_back
    blocks) and nonzero inside it; so is d out[t] / d k[s], and d out[t] / d q[s] is nonzero
    only at s = t, except at t = 0 (its one key gets weight 1, whatever q and k)."""
    rng = np.random.default_rng(3)
    N, S, look_back, H, D = 8, 3, 1, 2, 2
    q, k, v = (normal(rng, 1, N, H, D) for _ in range(3))
    jac = jax.jit(jax.jacrev(lambda q, k, v: local_attention(
        q, k, v, block_size=S, causal=True, look_back=look_back), argnums=(0, 1, 2)))(q, k, v)
    band = np_band_mask(N, S, look_back, causal=True)
    assert not band[6, :3].any() and band[6, 3:7].all() and not band[6, 7]
    np.testing.assert_array_equal(dependence_NxN(jac[0]), np.diag(np.arange(N) > 0))
    np.testing.assert_array_equal(dependence_NxN(jac[1]), band & (np.arange(N) > 0)[:, None])
    np.testing.assert_array_equal(dependence_NxN(jac[2]), band)


@pytest.mark.parametrize("attention,rotary", [("full", True), ("local", False)])
def test_multi_head_attention_gradient_is_causal(attention, rotary):
    """d out[t] / d x[s] is exactly zero for s > t (and, local, before the look_back blocks),
    nonzero for every other s <= t."""
    rng = np.random.default_rng(4)
    N, E, S, look_back = 7, 8, 3, 1
    model = MultiHeadAttention(num_heads=2, attention=attention, block_size=S,
                               look_back=look_back, causal=True, rotary=rotary)
    x = normal(rng, 1, N, E)
    variables = random_params(model, rng, x)
    jac = jax.jit(jax.jacrev(lambda x: model.apply(variables, x)))(x)
    expected = np_band_mask(N, S if attention == "local" else N, look_back, causal=True)
    np.testing.assert_array_equal(dependence_NxN(jac), expected)


# ----------------------------------------------------------------------------- decoding

DECODE_CASES = [  # (attention, block_size, look_back, rotary, key padding)
    ("full", 4, 0, False, False),
    ("full", 4, 0, True, True),
    ("local", 3, 0, False, True),
    ("local", 3, 1, True, True),
    ("local", 3, 2, True, False),  # window (9) longer than the cache (8)
]


@pytest.mark.parametrize("attention,S,look_back,rotary,padded", DECODE_CASES)
def test_decode_one_token_at_a_time_equals_whole_sequence(attention, S, look_back, rotary,
                                                          padded):
    """Cached decoding, one token at a time, and a prefill of a chunk (across a block
    boundary) followed by single steps, against the same parameters on the whole sequence.
    With padding, the key-padding mask [B, max_length] goes to every call."""
    rng = np.random.default_rng(5)
    B, N, E = 2, 8, 8
    kwargs = dict(num_heads=2, attention=attention, block_size=S, look_back=look_back,
                  causal=True, rotary=rotary)
    decoder, model = MultiHeadAttention(decode=True, **kwargs), MultiHeadAttention(**kwargs)
    x = normal(rng, B, N, E)
    mask = None
    if padded:
        mask = np.ones((B, N), bool)
        mask[1, [0, 2, 3, 4]] = False  # example 1's first query sees nothing
    variables = random_params(decoder, rng, x)  # init on [B, max_length, E] makes the cache
    assert jax.tree.map(np.shape, variables["cache"]) == {
        "cached_key": (B, N, 2, E // 2), "cached_value": (B, N, 2, E // 2), "cache_index": ()}
    if (attention, rotary) == ("full", False):  # once: init's own cache is that, all zeros
        assert_tree_close(jax.jit(decoder.init)(jax.random.key(0), x)["cache"],
                          variables["cache"], rtol=0, atol=0)
    expected = jax.jit(model.apply)({"params": variables["params"]}, x, mask=mask)
    step = jax.jit(lambda variables, x, mask: decoder.apply(variables, x, mask=mask,
                                                            mutable=["cache"]))

    def run(chunks):
        cache, outs = variables["cache"], []
        for start, stop in chunks:
            out, state = step({"params": variables["params"], "cache": cache},
                              x[:, start:stop], mask)
            cache = state["cache"]
            outs.append(np.asarray(out))
            assert int(cache["cache_index"]) == stop
        return np.concatenate(outs, axis=1)

    np.testing.assert_allclose(run([(t, t + 1) for t in range(N)]), expected, atol=1e-5)
    np.testing.assert_allclose(run([(0, 5)] + [(t, t + 1) for t in range(5, N)]), expected,
                               atol=1e-5)


# ----------------------------------------------------------------------------- Flax

def test_weights_copied_to_flax_multi_head_attention_give_the_same_outputs():
    """Full, non-causal attention with a key-padding mask (every example keeps some key: Flax
    gives a keyless query uniform weights, we give zeros), self- and cross-attention, with
    qkv_features and out_features different from the inputs' size. Flax takes the mask as
    [B, H, Q, K] (broadcastable): ours [B, K] goes to it as [B, 1, 1, K]."""
    rng = np.random.default_rng(6)
    B, Q, K, E, Ekv, H = 3, 5, 4, 6, 5, 2
    x, kv = normal(rng, B, Q, E), normal(rng, B, K, Ekv)
    ours = MultiHeadAttention(num_heads=H, qkv_features=8, out_features=7)
    theirs = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=8, out_features=7)
    for inputs_kv, length in ((None, Q), (kv, K)):
        mask = np.arange(length)[None] < np.array([[length], [2], [1]])
        mask[0, 1] = False
        variables = random_params(ours, rng, x, inputs_kv, mask=mask)
        p = variables["params"]
        p_flax = {"query": p["W_q"], "key": p["W_k"], "value": p["W_v"], "out": p["W_o"]}
        flax_shapes = jax.eval_shape(theirs.init, jax.random.key(0), x, inputs_kv)["params"]
        assert jax.tree.map(np.shape, p_flax) == jax.tree.map(np.shape, flax_shapes)
        out = jax.jit(lambda v, x, kv, m: ours.apply(v, x, kv, mask=m))(variables, x,
                                                                      inputs_kv, mask)
        ref = jax.jit(lambda v, x, kv, m: theirs.apply(v, x, kv, mask=m, deterministic=True))(
            {"params": p_flax}, x, inputs_kv, mask[:, None, None, :])
        assert out.shape == (B, Q, 7)
        np.testing.assert_allclose(out, ref, atol=1e-5)


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_clear_value_errors():
    """Checked before anything is traced or compiled, so these cost no compilation."""
    q = np.ones((1, 6, 2, 4), np.float32)
    for kwargs, match in [({"block_size": 0}, r"block_size=0: must be an integer >= 1"),
                          ({"block_size": -2}, r"block_size=-2"),
                          ({"block_size": 2.0}, r"block_size=2.0: must be an integer"),
                          ({"block_size": True}, r"block_size=True"),
                          ({"block_size": 2, "look_back": -1},
                           r"look_back=-1: must be an integer >= 0"),
                          ({"block_size": 2, "look_back": 1.0}, r"look_back=1.0"),
                          ({"block_size": 2, "look_ahead": -1},
                           r"look_ahead=-1: must be an integer >= 0"),
                          ({"block_size": 2, "look_ahead": 1.0}, r"look_ahead=1.0"),
                          ({"block_size": 2, "look_ahead": 1, "causal": True},
                           r"look_ahead=1 with causal=True"),
                          ({"block_size": 2, "blocks_per_step": 0},
                           r"blocks_per_step=0: must be an integer >= 1")]:
        with pytest.raises(ValueError, match=match):
            local_attention(q, q, q, **kwargs)
    with pytest.raises(ValueError, match="local_attention is self-attention"):
        local_attention(q, q[:, :5], q[:, :5], block_size=2)
    with pytest.raises(ValueError, match=r"look_ahead=2 with causal=True"):
        local_window_mask(6, 2, causal=True, look_ahead=2)

    x, kv = np.ones((1, 6, 8), np.float32), np.ones((1, 4, 8), np.float32)
    for model, args, match in [
            (MultiHeadAttention(2, attention="bogus"), (x,),
             r"attention='bogus': expected one of \('full', 'local'\)"),
            (MultiHeadAttention(3), (x,), r"qkv_features=8 is not divisible by num_heads=3"),
            (MultiHeadAttention(4, qkv_features=6), (x,), r"qkv_features=6 .* num_heads=4"),
            (MultiHeadAttention(2, decode=True), (x,), r"decode=True .* needs causal=True"),
            (MultiHeadAttention(2, attention="local", block_size=2), (x, kv),
             "for self-attention only"),
            (MultiHeadAttention(2, causal=True), (x, kv), "for self-attention only"),
            (MultiHeadAttention(2, attention="local", block_size=0), (x,), "block_size=0"),
            (MultiHeadAttention(2, attention="local", block_size=2.5), (x,), "block_size=2.5"),
            (MultiHeadAttention(2, attention="local", look_back=-1), (x,), "look_back=-1"),
            (MultiHeadAttention(2, attention="local", look_ahead=-1), (x,), "look_ahead=-1"),
            (MultiHeadAttention(2, attention="local", look_ahead=1, causal=True), (x,),
             r"look_ahead=1 with causal=True"),
            (MultiHeadAttention(2, attention="local", look_ahead=1, causal=True, decode=True),
             (x,), r"look_ahead=1 with decode=True"),
            (MultiHeadAttention(2, qkv_features=6, rotary=True), (x,), "even head dimension")]:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(model.init, jax.random.key(0), *args)


# ----------------------------------------------------------------------------- jit

def test_local_attention_jit_equals_no_jit():
    rng = np.random.default_rng(8)
    q, k, v = (normal(rng, 2, 7, 2, 3) for _ in range(3))
    mask = rng.random((2, 7)) < 0.7
    kwargs = dict(block_size=3, look_back=1, causal=True)
    eager = local_attention(q, k, v, mask=mask, **kwargs)
    jitted = jax.jit(lambda q, k, v, m: local_attention(q, k, v, mask=m, **kwargs))(q, k, v, mask)
    np.testing.assert_allclose(eager, jitted, atol=1e-6)
