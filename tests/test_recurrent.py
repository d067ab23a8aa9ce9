"""seqjax.nn.recurrent against a NumPy loop of the textbook equations, plus properties:
finite-difference gradients, padding, bidirectional and stacked wiring, jit equals no-jit."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from seqjax.nn.recurrent import (CELLS, Bidirectional, GRUCell, LSTMCell, Recurrent, RNNCell,
                                 StackedRecurrent)

BIAS_INIT = nn.initializers.normal(0.5)  # nonzero biases, so the reference checks them too
CASES = {  # name -> (cell class, extra kwargs)
    "rnn": (RNNCell, {}),
    "gru": (GRUCell, {}),
    "gru_reset_after": (GRUCell, {"reset_after": True}),
    "lstm": (LSTMCell, {"forget_bias": 1.0}),
}


def make_cell(name, features, **kwargs):
    cls, extra = CASES[name]
    return cls(features, bias_init=BIAS_INIT, **extra, **kwargs)


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
    carry = jax.tree.map(lambda a: np.asarray(a, np.float64), carry)
    ys = []
    for t in range(x_BxTxF.shape[1]):
        carry, y = np_step(name, p, carry, np.asarray(x_BxTxF[:, t], np.float64))
        ys.append(y)
    return carry, np.stack(ys, 1)


def random_carry(cell, rng, batch):
    zeros = cell.initialize_carry(None, (batch, 1))
    return jax.tree.map(lambda z: jnp.asarray(rng.normal(size=z.shape), z.dtype), zeros)


def jit_apply(model):
    """model.apply under jit: an eager apply retraces and recompiles its scan on every call."""
    return jax.jit(model.apply, static_argnames=("return_carry", "deterministic"))


def assert_tree_close(a, b, **kw):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw), a, b)


# ----------------------------------------------------------------------------- cells vs NumPy

@pytest.mark.parametrize("name", sorted(CASES))
def test_recurrent_matches_numpy_loop(name):
    rng = np.random.default_rng(sorted(CASES).index(name))
    B, T, F, H = rng.integers(1, 4), rng.integers(2, 7), rng.integers(1, 6), rng.integers(2, 6)
    cell = make_cell(name, int(H))
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    carry0 = random_carry(cell, rng, B)
    model = Recurrent(cell, return_carry=True)
    variables = model.init(jax.random.key(0), x, carry0)
    p = variables["params"]["cell"]
    carry, y = model.apply(variables, x, carry0)
    ref_carry, ref_y = np_run(name, p, carry0, x)
    assert y.shape == (B, T, H)
    np.testing.assert_allclose(y, ref_y, atol=1e-5)
    assert_tree_close(carry, ref_carry, atol=1e-5)

    # The single-step __call__ on the same parameters.
    step_carry, step_y = cell.apply({"params": p}, carry0, x[:, 0])
    ref_step_carry, ref_step_y = np_step(name, p, jax.tree.map(np.asarray, carry0),
                                         np.asarray(x[:, 0], np.float64))
    np.testing.assert_allclose(step_y, ref_step_y, atol=1e-5)
    assert_tree_close(step_carry, ref_step_carry, atol=1e-5)


def test_param_tree_names_and_shapes():
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
        p = cell.init(jax.random.key(0), cell.initialize_carry(None, (2, F)), jnp.ones((2, F)))
        assert jax.tree.map(jnp.shape, p["params"]) == shapes, name
    lstm = LSTMCell(H, forget_bias=1.0)
    p = lstm.init(jax.random.key(0), lstm.initialize_carry(None, (2, F)), jnp.ones((2, F)))
    np.testing.assert_array_equal(p["params"]["b_f"], np.ones(H))
    np.testing.assert_array_equal(p["params"]["b_i"], np.zeros(H))


def test_bfloat16_computation_keeps_float32_carry_and_params():
    model = Recurrent(LSTMCell(4, dtype=jnp.bfloat16), return_carry=True)
    x = jnp.ones((2, 3, 5))
    variables = model.init(jax.random.key(0), x)
    (c, h), y = model.apply(variables, x)
    assert y.dtype == jnp.bfloat16 and c.dtype == h.dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_finite_differences(name):
    with jax.enable_x64(True):
        rng = np.random.default_rng(10)
        B, T, F, H = 2, 4, 3, 3
        model = Recurrent(make_cell(name, H, param_dtype=jnp.float64), return_carry=True)
        x = jnp.asarray(rng.normal(size=(B, T, F)))
        lengths = jnp.array([T, 2])
        params = model.init(jax.random.key(1), x)["params"]
        w_y = jnp.asarray(rng.normal(size=(B, T, H)))

        @jax.jit
        def loss(params, x):
            carry, y = model.apply({"params": params}, x, seq_lengths=lengths)
            return jnp.sum(w_y * y) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry))

        grads = jax.grad(loss, argnums=(0, 1))(params, x)
        flat, unflatten = ravel_pytree((params, x))
        flat_grads, _ = ravel_pytree(grads)
        eps = 1e-6
        for k in rng.choice(flat.size, size=12, replace=False):
            e = jnp.zeros_like(flat).at[k].set(eps)
            fd = (loss(*unflatten(flat + e)) - loss(*unflatten(flat - e))) / (2 * eps)
            np.testing.assert_allclose(flat_grads[k], fd, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- padding

@pytest.mark.parametrize("name", ["gru_reset_after", "lstm"])
def test_seq_lengths(name):
    rng = np.random.default_rng(3)
    B, T, F, H = 3, 6, 2, 4
    lengths = np.array([6, 3, 1])
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    fwd, bwd = (Recurrent(make_cell(name, H), reverse=r, return_carry=True) for r in (False, True))
    variables = fwd.init(jax.random.key(0), x)  # the same tree serves both directions
    apply_fwd = jit_apply(fwd)
    pad_B1xT = np.arange(T)[None] >= lengths[:, None]
    x_noise = jnp.where(pad_B1xT[..., None], 100.0 * rng.normal(size=x.shape), x)
    for model in (fwd, bwd):
        apply = jit_apply(model)
        carry, y = apply(variables, x, seq_lengths=lengths)
        assert np.all(np.asarray(y)[pad_B1xT] == 0)
        # Padded inputs change nothing at all.
        carry_n, y_n = apply(variables, x_noise, seq_lengths=lengths)
        np.testing.assert_array_equal(y, y_n)
        assert_tree_close(carry, carry_n, rtol=0, atol=0)
        for b, L in enumerate(lengths):
            prefix = x[b:b + 1, :L]
            if model.reverse:  # = a forward run over the reversed valid prefix
                ref_carry, ref_y = apply_fwd(variables, prefix[:, ::-1])
                ref_y = ref_y[:, ::-1]
            else:
                ref_carry, ref_y = apply_fwd(variables, prefix)
            np.testing.assert_allclose(y[b:b + 1, :L], ref_y, atol=1e-6)
            assert_tree_close(jax.tree.map(lambda a: a[b:b + 1], carry), ref_carry, atol=1e-6)
    # A length-0 sequence keeps the initial carry.
    carry, y = apply_fwd(variables, x, seq_lengths=np.array([0, 2, 6]))
    assert_tree_close(jax.tree.map(lambda a: a[0], carry), fwd.cell.initialize_carry(None, (H,)),
                      rtol=0, atol=0)


# ----------------------------------------------------------------------------- bidirectional

@pytest.mark.parametrize("merge", ["concat", "sum"])
def test_bidirectional(merge):
    rng = np.random.default_rng(4)
    B, T, F, H = 2, 5, 3, 4
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    lengths = np.array([5, 3])
    model = Bidirectional(Recurrent(GRUCell(H)), Recurrent(GRUCell(H), reverse=True), merge=merge,
                          return_carry=True)
    variables = model.init(jax.random.key(0), x)
    apply = jit_apply(model)
    (carry_f, carry_b), y = apply(variables, x, seq_lengths=lengths)
    assert y.shape == (B, T, 2 * H if merge == "concat" else H)
    p = variables["params"]
    ref_cf, ref_f = Recurrent(GRUCell(H), return_carry=True).apply(
        {"params": p["forward_rnn"]}, x, seq_lengths=lengths)
    ref_cb, ref_b = Recurrent(GRUCell(H), reverse=True, return_carry=True).apply(
        {"params": p["backward_rnn"]}, x, seq_lengths=lengths)
    ref = jnp.concatenate([ref_f, ref_b], -1) if merge == "concat" else ref_f + ref_b
    np.testing.assert_allclose(y, ref, atol=1e-6)
    np.testing.assert_allclose(carry_f, ref_cf, atol=1e-6)
    np.testing.assert_allclose(carry_b, ref_cb, atol=1e-6)
    assert apply(variables, x, seq_lengths=lengths, return_carry=False).shape == y.shape


# ----------------------------------------------------------------------------- stacked

def test_stacked_equals_chained_layers():
    rng = np.random.default_rng(5)
    B, T, F, H = 2, 4, 3, 5
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    lengths = np.array([4, 2])
    model = StackedRecurrent("lstm", H, num_layers=2, dropout_rate=0.5, forget_bias=1.0)
    variables = model.init(jax.random.key(0), x)
    assert set(variables["params"]) == {"layer_0", "layer_1"}
    assert variables["params"]["layer_0"]["W_xi"].shape == (F, H)
    apply = jit_apply(model)
    carries, y = apply(variables, x, seq_lengths=lengths)
    layer = jit_apply(Recurrent(LSTMCell(H), return_carry=True))
    c0, h0 = layer({"params": {"cell": variables["params"]["layer_0"]}}, x, seq_lengths=lengths)
    c1, h1 = layer({"params": {"cell": variables["params"]["layer_1"]}}, h0, seq_lengths=lengths)
    np.testing.assert_allclose(y, h1, atol=1e-6)
    assert_tree_close(carries, (c0, c1), atol=1e-6)
    zeros = model.initialize_carry(None, (B, F))
    assert jax.tree.structure(zeros) == jax.tree.structure(carries)
    assert jax.tree.map(jnp.shape, zeros) == jax.tree.map(jnp.shape, carries)

    # Dropout only when deterministic=False, and then it needs a 'dropout' rng.
    with pytest.raises(flax.errors.InvalidRngError):
        apply(variables, x, seq_lengths=lengths, deterministic=False)
    _, y_drop = apply(variables, x, seq_lengths=lengths, deterministic=False,
                            rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(y_drop, y)
    # ...and never after the last layer.
    one_layer = StackedRecurrent("lstm", H, num_layers=1, dropout_rate=0.5)
    v1 = one_layer.init(jax.random.key(0), x)
    apply1 = jit_apply(one_layer)
    np.testing.assert_array_equal(apply1(v1, x, deterministic=False)[1], apply1(v1, x)[1])


def test_stacked_bidirectional_and_initial_carry():
    B, T, F, H = 2, 3, 2, 3
    x = jnp.ones((B, T, F))
    model = StackedRecurrent("gru", H, num_layers=2, bidirectional=True, reset_after=True)
    variables = model.init(jax.random.key(0), x)
    assert set(variables["params"]) == {"layer_0_fwd", "layer_0_bwd", "layer_1_fwd", "layer_1_bwd"}
    assert variables["params"]["layer_1_fwd"]["W_xr"].shape == (2 * H, H)
    assert "b_hh" in variables["params"]["layer_0_fwd"]
    zeros = model.initialize_carry(None, (B, F))
    apply = jit_apply(model)
    carries, y = apply(variables, x, zeros)
    assert y.shape == (B, T, 2 * H)
    assert jax.tree.structure(carries) == jax.tree.structure(zeros)
    carries_default, _ = apply(variables, x)
    assert_tree_close(carries, carries_default, rtol=0, atol=0)


def test_unknown_cell_type():
    with pytest.raises(ValueError, match="lstm"):
        StackedRecurrent("transformer", 4).init(jax.random.key(0), jnp.ones((1, 2, 3)))
    assert set(CELLS) == {"rnn", "gru", "lstm"}


# ----------------------------------------------------------------------------- jit

def test_jit_equals_no_jit():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 5, 3)), jnp.float32)
    lengths = jnp.array([5, 2])
    model = StackedRecurrent("lstm", 4, num_layers=2, unroll=2)
    variables = model.init(jax.random.key(0), x)
    eager = model.apply(variables, x, seq_lengths=lengths)
    jitted = jax.jit(lambda v, x, n: model.apply(v, x, seq_lengths=n))(variables, x, lengths)
    assert_tree_close(eager, jitted, atol=1e-6)
