"""seqjax.nn.position against naive references: the sinusoidal formula computed entry by entry
in a Python loop, rotary embeddings as explicit 2x2 rotations of the feature pairs (i, i + D/2)
in NumPy; plus properties: rotations preserve norms, rotated dot products depend only on the
offset m - n, the learned table is added at the right positions, clear errors for bad inputs."""

import math

import jax
import numpy as np
import pytest

from seqjax.nn.position import LearnedPosition, rotary, sinusoidal_encoding


@pytest.mark.parametrize("length,dim", [(9, 6), (7, 5), (3, 1), (0, 4)])
def test_sinusoidal_encoding_matches_formula(length, dim):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), even
    and odd d."""
    pe = sinusoidal_encoding(length, dim)
    assert pe.shape == (length, dim) and pe.dtype == np.float32
    ref = np.zeros((length, dim))
    for pos in range(length):
        for j in range(dim):
            i = j // 2
            angle = pos / 10000 ** (2 * i / dim)
            ref[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    np.testing.assert_allclose(pe, ref, atol=1e-6)
    for bad in ((-1, 4), (3, 0)):
        with pytest.raises(ValueError, match="need length >= 0 and dim > 0"):
            sinusoidal_encoding(*bad)


def np_rotary(x_BxLxHxD, positions, base=10000.0):
    """Each feature pair (i, i + D/2) rotated by the angle position / base^(2i/D)."""
    x = np.asarray(x_BxLxHxD, np.float64)
    D = x.shape[-1]
    out = np.zeros_like(x)
    for idx, pos in enumerate(positions):
        for i in range(D // 2):
            theta = pos / base ** (2 * i / D)
            c, s = math.cos(theta), math.sin(theta)
            a, b = x[:, idx, :, i], x[:, idx, :, i + D // 2]
            out[:, idx, :, i], out[:, idx, :, i + D // 2] = c * a - s * b, s * a + c * b
    return out


def test_rotary_is_a_rotation_of_feature_pairs():
    rng = np.random.default_rng(0)
    B, L, H, D = 2, 5, 3, 8
    x = rng.normal(size=(B, L, H, D)).astype(np.float32)
    positions = np.array([0, 1, 4, 17, 1000])
    out = np.asarray(jax.jit(rotary)(x, positions))
    np.testing.assert_allclose(out, np_rotary(x, positions), atol=1e-4)
    np.testing.assert_allclose(out[:, 0], x[:, 0], atol=1e-7)  # position 0: no rotation
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)


def test_rotary_dot_products_depend_only_on_the_offset():
    """<R(m) q, R(n) k> is the same for every pair (m, n) with the same m - n, and differs
    between offsets."""
    rng = np.random.default_rng(1)
    D = 8
    q, k = rng.normal(size=(2, 1, 1, 1, D)).astype(np.float32)
    rotate = jax.jit(rotary)
    positions = np.arange(40)
    q_rot = np.asarray(rotate(np.broadcast_to(q, (1, 40, 1, D)), positions))[0, :, 0]
    k_rot = np.asarray(rotate(np.broadcast_to(k, (1, 40, 1, D)), positions))[0, :, 0]
    dots = q_rot @ k_rot.T  # [m, n]
    for offset in (-7, -1, 0, 3, 11):
        pairs = [(m, m - offset) for m in range(40) if 0 <= m - offset < 40]
        same = np.array([dots[m, n] for m, n in pairs])
        np.testing.assert_allclose(same, same[0], atol=1e-4)
    assert abs(dots[5, 2] - dots[5, 3]) > 1e-2  # offsets 3 and 2 differ


def test_rotary_odd_head_dim_raises():
    with pytest.raises(ValueError, match="even head dimension, got 5"):
        rotary(np.ones((1, 2, 1, 5), np.float32), np.arange(2))


def test_learned_position_adds_the_table_and_refuses_long_sequences():
    rng = np.random.default_rng(2)
    model = LearnedPosition(max_length=6)
    x = rng.normal(size=(2, 4, 3)).astype(np.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    assert shapes["params"]["P"].shape == (6, 3)
    P = rng.normal(size=(6, 3)).astype(np.float32)
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply({"params": {"P": P}}, x), x + P[:4], atol=1e-6)
    np.testing.assert_allclose(apply({"params": {"P": P}}, x, 2), x + P[2:6], atol=1e-6)
    model.apply({"params": {"P": P}}, np.zeros((1, 6, 3), np.float32))  # max_length is fine
    with pytest.raises(ValueError, match="sequence of length 7 is longer than the model's "
                                         "max_length 6"):
        model.apply({"params": {"P": P}}, np.zeros((1, 7, 3), np.float32))
