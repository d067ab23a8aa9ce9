"""Block-local attention with look_ahead (blocks after a query's own it also sees), beyond the
band-mask cases of test_attention.py: locality read off Jacobians, of `local_attention` and of
`MultiHeadAttention`, and packed rows (segment ids) against full attention."""

import jax
import numpy as np
from test_attention import dependence_NxN, normal, np_band_mask, random_params

from seqjax.nn.attention import MultiHeadAttention, dot_product_attention, local_attention


def test_local_attention_gradient_is_local_with_look_ahead():
    """d out[t] / d v[s] and d out[t] / d k[s] are exactly zero outside the band (s before the
    look_back blocks or after the look_ahead blocks) and nonzero inside it; d out[t] / d q[s]
    is nonzero only at s = t. 4 blocks of 3 (the last one short), one block a scan step."""
    rng = np.random.default_rng(12)
    N, S, look_back, look_ahead, H, D = 11, 3, 1, 1, 2, 2
    q, k, v = (normal(rng, 1, N, H, D) for _ in range(3))
    jac = jax.jit(jax.jacrev(lambda q, k, v: local_attention(
        q, k, v, block_size=S, look_back=look_back, look_ahead=look_ahead, blocks_per_step=1),
        argnums=(0, 1, 2)))(q, k, v)
    band = np_band_mask(N, S, look_back, False, look_ahead)
    assert band[1, :6].all() and not band[1, 6:].any()  # block 0 sees blocks 0 and 1
    assert not band[7, :3].any() and band[7, 3:].all()  # block 2 sees blocks 1 to 3
    np.testing.assert_array_equal(dependence_NxN(jac[0]), np.eye(N, dtype=bool))
    np.testing.assert_array_equal(dependence_NxN(jac[1]), band)
    np.testing.assert_array_equal(dependence_NxN(jac[2]), band)


def test_multi_head_attention_look_ahead_gradient_is_the_band():
    """MultiHeadAttention passes look_ahead on: d out[t] / d x[s] is nonzero exactly in the
    band of look_back 0 and look_ahead 1."""
    rng = np.random.default_rng(13)
    N, E, S = 7, 8, 2
    model = MultiHeadAttention(num_heads=2, attention="local", block_size=S, look_ahead=1)
    x = normal(rng, 1, N, E)
    variables = random_params(model, rng, x)
    jac = jax.jit(jax.jacrev(lambda x: model.apply(variables, x)))(x)
    np.testing.assert_array_equal(dependence_NxN(jac), np_band_mask(N, S, 0, False, 1))


def test_local_attention_look_ahead_keeps_packed_segments_apart():
    """Segment ids with look_back 1 and look_ahead 2, blocks of 2 in steps of 2: values and
    gradients equal full attention under the band, same-segment and not-padding masks."""
    rng = np.random.default_rng(14)
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0],
                         [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0]])
    B, N = segments.shape
    q, k, v, cotangent = (normal(rng, B, N, 2, 3) for _ in range(4))
    allowed = (np_band_mask(N, 2, 1, False, 2)[None]
               & (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0))

    @jax.jit
    def both(q, k, v, cotangent):
        local = lambda q, k, v: local_attention(q, k, v, block_size=2, look_back=1, look_ahead=2,
                                                segment_ids=segments, blocks_per_step=2)
        full = lambda q, k, v: dot_product_attention(q, k, v, allowed[:, None])
        return [(out, vjp(cotangent)) for out, vjp in (jax.vjp(f, q, k, v) for f in (local, full))]

    (out, grads), (ref_out, ref_grads) = both(q, k, v, cotangent)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    for g, ref_g in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref_g, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[segments == 0], 0.0)
