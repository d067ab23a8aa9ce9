"""seqjax.nn.recurrent against a NumPy loop of the textbook equations, plus properties:
finite-difference gradients, padding, bidirectional and stacked wiring, jit equals no-jit.

Compilation is nearly all of these tests' time, so they compile little: parameters are random
arrays shaped by `jax.eval_shape(model.init)` (tracing only; jitting an init compiles a
threefry per initialiser), and applies run under jit (eagerly, each apply recompiles its scan).
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from seqjax.nn.recurrent import (CELLS, Bidirectional, GRUCell, LSTMCell, Recurrent, RNNCell,
                                 StackedRecurrent)

CASES = {  # name -> (cell class, extra kwargs)
    "rnn": (RNNCell, {}),
    "gru": (GRUCell, {}),
    "gru_reset_after": (GRUCell, {"reset_after": True}),
    "lstm": (LSTMCell, {"forget_bias": 1.0}),
}


def make_cell(name, features, **kwargs):
    cls, extra = CASES[name]
    return cls(features, **extra, **kwargs)


def random_params(model, rng, *args, **kwargs):
    """Variables shaped like model.init's, filled with N(0, 0.5^2): nonzero biases included."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)


def random_carry(cell, rng, batch):
    zeros = cell.initialize_carry(None, (batch, 1))
    return jax.tree.map(lambda z: jnp.asarray(rng.normal(size=z.shape), z.dtype), zeros)


def jit_apply(model):
    return jax.jit(model.apply, static_argnames=("return_carry", "deterministic"))


def assert_tree_close(a, b, **kw):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw), a, b)


# ----------------------------------------------------------------------------- NumPy reference

def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def np_step(name, p, carry, x):
    """One step of the textbook equations, weights read from the param tree by name."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    lin = lambda g, h: x @ p[f"W_x{g}"] + h @ p[f"W_h{g}"] + p[f"b_{g}"]
    if name == "rnn":
        h = np.tanh(lin("h", carry))
        return h, h
    if name.startswith("gru"):
        h = carry
        r, z = sigmoid(lin("r", h)), sigmoid(lin("z", h))
        if name == "gru_reset_after":
            cand = np.tanh(x @ p["W_xh"] + r * (h @ p["W_hh"] + p["b_hh"]) + p["b_h"])
        else:
            cand = np.tanh(x @ p["W_xh"] + (r * h) @ p["W_hh"] + p["b_h"])
        h = z * h + (1 - z) * cand
        return h, h
    c, h = carry
    i, f, o = sigmoid(lin("i", h)), sigmoid(lin("f", h)), sigmoid(lin("o", h))
    c = f * c + i * np.tanh(lin("c", h))
    h = o * np.tanh(c)
    return (c, h), h


def np_run(name, p, carry, x_BxTxF):
    """(final carry, outputs_BxTxH) of a Python loop over time."""
    carry = jax.tree.map(lambda a: np.asarray(a, np.float64), carry)
    ys = []
    for t in range(x_BxTxF.shape[1]):
        carry, y = np_step(name, p, carry, np.asarray(x_BxTxF[:, t], np.float64))
        ys.append(y)
    H = jax.tree.leaves(carry)[0].shape[-1]
    return carry, np.stack(ys, 1) if ys else np.zeros(x_BxTxF.shape[:2] + (H,))


# ----------------------------------------------------------------------------- cells vs NumPy

@pytest.mark.parametrize("name", sorted(CASES))
def test_recurrent_matches_numpy_loop(name):
    rng = np.random.default_rng(sorted(CASES).index(name))
    B, T, F, H = (int(n) for n in rng.integers([1, 2, 1, 2], [4, 7, 6, 6]))
    cell = make_cell(name, H)
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    carry0 = random_carry(cell, rng, B)
    model = Recurrent(cell, return_carry=True)
    variables = random_params(model, rng, x, carry0)
    p = variables["params"]["cell"]
    carry, y = jit_apply(model)(variables, x, carry0)
    ref_carry, ref_y = np_run(name, p, carry0, x)
    assert y.shape == (B, T, H)
    np.testing.assert_allclose(y, ref_y, atol=1e-5)
    assert_tree_close(carry, ref_carry, atol=1e-5)

    # The single-step __call__ on the same parameters.
    step_carry, step_y = jax.jit(cell.apply)({"params": p}, carry0, x[:, 0])
    ref_step_carry, ref_step_y = np_step(name, p, jax.tree.map(np.asarray, carry0),
                                         np.asarray(x[:, 0], np.float64))
    np.testing.assert_allclose(step_y, ref_step_y, atol=1e-5)
    assert_tree_close(step_carry, ref_step_carry, atol=1e-5)


def test_param_tree_names_and_default_init():
    F, H = 3, 5
    expected = {
        "rnn": {"W_xh": (F, H), "W_hh": (H, H), "b_h": (H,)},
        "gru": {f"W_x{g}": (F, H) for g in "rzh"} | {f"W_h{g}": (H, H) for g in "rzh"}
        | {f"b_{g}": (H,) for g in "rzh"},
        "lstm": {f"W_x{g}": (F, H) for g in "ifoc"} | {f"W_h{g}": (H, H) for g in "ifoc"}
        | {f"b_{g}": (H,) for g in "ifoc"},
    }
    expected["gru_reset_after"] = expected["gru"] | {"b_hh": (H,)}
    for name, shapes in expected.items():
        cell = make_cell(name, H)
        p = jax.eval_shape(cell.init, jax.random.key(0), cell.initialize_carry(None, (2, F)),
                           jnp.ones((2, F)))
        assert jax.tree.map(jnp.shape, p["params"]) == shapes, name
    # Orthogonal recurrent kernels; zero biases, plus forget_bias on b_f.
    lstm = LSTMCell(H, forget_bias=1.0)
    p = lstm.init(jax.random.key(0), lstm.initialize_carry(None, (2, F)), jnp.ones((2, F)))
    p = p["params"]
    np.testing.assert_allclose(p["W_hf"] @ p["W_hf"].T, np.eye(H), atol=1e-5)
    np.testing.assert_array_equal(p["b_f"], np.ones(H))
    np.testing.assert_array_equal(p["b_i"], np.zeros(H))


def test_bfloat16_computation_keeps_float32_carry():
    model = Recurrent(LSTMCell(4, dtype=jnp.bfloat16), return_carry=True)
    x = jnp.ones((2, 3, 5))
    variables = random_params(model, np.random.default_rng(0), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
    (c, h), y = jit_apply(model)(variables, x)
    assert y.dtype == jnp.bfloat16 and c.dtype == h.dtype == jnp.float32


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_finite_differences(name):
    with jax.enable_x64(True):
        rng = np.random.default_rng(10)
        B, T, F, H = 2, 4, 3, 3
        model = Recurrent(make_cell(name, H, param_dtype=jnp.float64), return_carry=True)
        x = jnp.asarray(rng.normal(size=(B, T, F)))
        lengths = jnp.array([T, 2])
        params = random_params(model, rng, x)["params"]
        w_y = jnp.asarray(rng.normal(size=(B, T, H)))
        flat, unflatten = ravel_pytree((params, x))

        def loss(flat):
            params, x = unflatten(flat)
            carry, y = model.apply({"params": params}, x, seq_lengths=lengths)
            return jnp.sum(w_y * y) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry))

        loss_and_grad = jax.jit(jax.value_and_grad(loss))  # one compile serves both
        grad = loss_and_grad(flat)[1]  # wrt every parameter and input
        eps = 1e-6
        for k in rng.choice(flat.size, size=12, replace=False):
            e = np.zeros(flat.size)
            e[k] = eps
            fd = (loss_and_grad(flat + e)[0] - loss_and_grad(flat - e)[0]) / (2 * eps)
            np.testing.assert_allclose(grad[k], fd, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- padding

@pytest.mark.parametrize("name", ["gru_reset_after", "lstm"])
def test_seq_lengths(name):
    rng = np.random.default_rng(3)
    B, T, F, H = 3, 6, 2, 4
    lengths = np.array([6, 3, 0])
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    carry0 = random_carry(make_cell(name, H), rng, B)
    pad_BxT = np.arange(T)[None] >= lengths[:, None]
    x_noise = jnp.where(pad_BxT[..., None], 100.0 * rng.normal(size=x.shape), x)
    cell = make_cell(name, H)
    variables = random_params(Recurrent(cell), rng, x)  # one tree serves both directions
    for reverse in (False, True):
        model = Recurrent(cell, reverse=reverse, return_carry=True)
        apply = jit_apply(model)
        carry, y = apply(variables, x, carry0, seq_lengths=lengths)
        assert np.all(np.asarray(y)[pad_BxT] == 0)
        # Padded inputs change nothing at all.
        carry_n, y_n = apply(variables, x_noise, carry0, seq_lengths=lengths)
        np.testing.assert_array_equal(y, y_n)
        assert_tree_close(carry, carry_n, rtol=0, atol=0)
        # Each sequence as if run alone, truncated to its own length (reversed if backward);
        # a length-0 one keeps its initial carry.
        for b, L in enumerate(lengths):
            prefix = x[b:b + 1, :L][:, ::-1] if reverse else x[b:b + 1, :L]
            carry0_b = jax.tree.map(lambda a: a[b:b + 1], carry0)
            ref_carry, ref_y = np_run(name, variables["params"]["cell"], carry0_b, prefix)
            np.testing.assert_allclose(y[b:b + 1, :L], ref_y[:, ::-1] if reverse else ref_y,
                                       atol=1e-5)
            assert_tree_close(jax.tree.map(lambda a: a[b:b + 1], carry), ref_carry, atol=1e-5)


# ----------------------------------------------------------------------------- bidirectional

def test_bidirectional_concat_and_sum():
    rng = np.random.default_rng(4)
    B, T, F, H = 2, 5, 3, 4
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    lengths = np.array([5, 3])
    fwd, bwd = (Recurrent(GRUCell(H), reverse=r, return_carry=True) for r in (False, True))
    model = Bidirectional(fwd, bwd, return_carry=True)
    variables = random_params(model, rng, x)
    (carry_f, carry_b), y = jit_apply(model)(variables, x, seq_lengths=lengths)
    assert y.shape == (B, T, 2 * H)
    p = variables["params"]
    ref_cf, ref_f = jit_apply(fwd)({"params": p["forward_rnn"]}, x, seq_lengths=lengths)
    ref_cb, ref_b = jit_apply(bwd)({"params": p["backward_rnn"]}, x, seq_lengths=lengths)
    np.testing.assert_allclose(y, jnp.concatenate([ref_f, ref_b], -1), atol=1e-6)
    np.testing.assert_allclose(carry_f, ref_cf, atol=1e-6)
    np.testing.assert_allclose(carry_b, ref_cb, atol=1e-6)

    summed = Bidirectional(fwd, bwd, merge="sum")  # same tree, outputs only
    y_sum = jit_apply(summed)(variables, x, seq_lengths=lengths)
    np.testing.assert_allclose(y_sum, ref_f + ref_b, atol=1e-6)
    with pytest.raises(ValueError, match="reverse"):
        Bidirectional(fwd, fwd).init(jax.random.key(0), x)


# ----------------------------------------------------------------------------- stacked

def test_stacked_equals_chained_layers_and_dropout():
    rng = np.random.default_rng(5)
    B, T, F, H = 2, 4, 3, 5
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    lengths = np.array([4, 2])
    model = StackedRecurrent("lstm", H, num_layers=2, dropout_rate=0.5)
    variables = random_params(model, rng, x)
    assert jax.tree.map(jnp.shape, variables)["params"]["layer_1"]["W_xi"] == (H, H)
    apply = jit_apply(model)
    carries, y = apply(variables, x, seq_lengths=lengths)
    layer = jit_apply(Recurrent(LSTMCell(H), return_carry=True))
    c0, h0 = layer({"params": {"cell": variables["params"]["layer_0"]}}, x, seq_lengths=lengths)
    c1, h1 = layer({"params": {"cell": variables["params"]["layer_1"]}}, h0, seq_lengths=lengths)
    np.testing.assert_allclose(y, h1, atol=1e-6)
    assert_tree_close(carries, (c0, c1), atol=1e-6)
    zeros = model.initialize_carry(None, (B, F))
    assert jax.tree.map(jnp.shape, zeros) == jax.tree.map(jnp.shape, carries)

    # Dropout only when deterministic=False, and then it needs a 'dropout' rng...
    with pytest.raises(flax.errors.InvalidRngError):
        apply(variables, x, seq_lengths=lengths, deterministic=False)
    _, y_drop = apply(variables, x, seq_lengths=lengths, deterministic=False,
                      rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(y_drop, y)
    # ...and never after the last layer.
    one_layer = StackedRecurrent("lstm", H, num_layers=1, dropout_rate=0.5)
    v1 = {"params": {"layer_0": variables["params"]["layer_0"]}}
    _, y1 = jit_apply(one_layer)(v1, x, seq_lengths=lengths, deterministic=False)
    np.testing.assert_array_equal(y1, h0)


def test_stacked_bidirectional_tree_and_carries():
    B, T, F, H = 2, 3, 2, 3
    x = jnp.asarray(np.random.default_rng(7).normal(size=(B, T, F)), jnp.float32)
    model = StackedRecurrent("gru", H, num_layers=2, bidirectional=True, reset_after=True)
    shapes = jax.tree.map(jnp.shape, jax.eval_shape(model.init, jax.random.key(0), x))["params"]
    assert set(shapes) == {"layer_0_fwd", "layer_0_bwd", "layer_1_fwd", "layer_1_bwd"}
    assert shapes["layer_1_fwd"]["W_xr"] == (2 * H, H) and "b_hh" in shapes["layer_0_bwd"]
    variables = random_params(model, np.random.default_rng(8), x)
    zeros = model.initialize_carry(None, (B, F))
    apply = jit_apply(model)
    carries, y = apply(variables, x, zeros)
    assert y.shape == (B, T, 2 * H)
    assert jax.tree.structure(carries) == jax.tree.structure(zeros)
    assert_tree_close(carries, apply(variables, x)[0], rtol=0, atol=0)  # None = zeros


def test_unknown_cell_type():
    with pytest.raises(ValueError, match="'gru', 'lstm', 'rnn'"):
        StackedRecurrent("transformer", 4).init(jax.random.key(0), jnp.ones((1, 2, 3)))
    assert CELLS == {"rnn": RNNCell, "gru": GRUCell, "lstm": LSTMCell}


# ----------------------------------------------------------------------------- jit

def test_jit_equals_no_jit():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
    lengths = jnp.array([5, 2])
    model = Recurrent(LSTMCell(4), return_carry=True, unroll=2)
    variables = random_params(model, rng, x)
    eager = model.apply(variables, x, seq_lengths=lengths)
    jitted = jax.jit(lambda v, x, n: model.apply(v, x, seq_lengths=n))(variables, x, lengths)
    assert_tree_close(eager, jitted, atol=1e-6)
