"""seqjax.nn.recurrent against naive references: a NumPy loop of the textbook equations, the
same loop in JAX (values and gradients), Flax's own LSTM and GRU cells on copied weights, and a
bidirectional layer rebuilt by hand from reversed prefixes; plus properties: finite-difference
gradients, padding, stacked wiring, clear errors for bad inputs, jit equals no-jit.

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

from seqjax.nn.recurrent import (
    CELLS,
    Bidirectional,
    GRUCell,
    LSTMCell,
    Recurrent,
    RNNCell,
    StackedRecurrent,
)

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


# ----------------------------------------------------------------------------- references

def textbook_step(name, p, carry, x, xnp):
    """One step of the textbook equations with the separate per-gate parameters, read from the
    param tree by name; `xnp` is numpy (float64 reference) or jax.numpy (to differentiate)."""
    sigmoid = lambda a: 1 / (1 + xnp.exp(-a))
    lin = lambda g, h: x @ p[f"W_x{g}"] + h @ p[f"W_h{g}"] + p[f"b_{g}"]
    if name == "rnn":
        h = xnp.tanh(lin("h", carry))
        return h, h
    if name.startswith("gru"):
        h = carry
        r, z = sigmoid(lin("r", h)), sigmoid(lin("z", h))
        if name == "gru_reset_after":
            cand = xnp.tanh(x @ p["W_xh"] + p["b_h"] + r * (h @ p["W_hh"] + p["b_hh"]))
        else:
            cand = xnp.tanh(x @ p["W_xh"] + (r * h) @ p["W_hh"] + p["b_h"])
        h = z * h + (1 - z) * cand
        return h, h
    c, h = carry
    i, f, o = sigmoid(lin("i", h)), sigmoid(lin("f", h)), sigmoid(lin("o", h))
    c = f * c + i * xnp.tanh(lin("c", h))
    h = o * xnp.tanh(c)
    return (c, h), h


def np_step(name, p, carry, x):
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    return textbook_step(name, p, carry, x, np)


def np_run(name, p, carry, x_BxTxF):
    """(final carry, outputs_BxTxH) of a Python loop over time, in float64 NumPy."""
    carry = jax.tree.map(lambda a: np.asarray(a, np.float64), carry)
    ys = []
    for t in range(x_BxTxF.shape[1]):
        carry, y = np_step(name, p, carry, np.asarray(x_BxTxF[:, t], np.float64))
        ys.append(y)
    H = jax.tree.leaves(carry)[0].shape[-1]
    return carry, np.stack(ys, 1) if ys else np.zeros(x_BxTxF.shape[:2] + (H,))


def jnp_run(name, p, carry, x_BxTxF):
    """The same loop in JAX, unrolled in Python: (final carry, outputs_BxTxH)."""
    ys = []
    for t in range(x_BxTxF.shape[1]):
        carry, y = textbook_step(name, p, carry, x_BxTxF[:, t], jnp)
        ys.append(y)
    return carry, jnp.stack(ys, 1)


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

    # Gradients through the fused weight-gradient VJP (the default), padding included: finite,
    # and in the dtypes of what they differentiate (float32 parameters, inputs and carry).
    def loss(variables, x, carry0):
        (c, h), y = model.apply(variables, x, carry0, seq_lengths=jnp.array([3, 1]))
        return jnp.sum(jnp.square(y.astype(jnp.float32))) + jnp.sum(c) + jnp.sum(h)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(variables, x, (c, h))
    assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.any(grads[0]["params"]["cell"]["W_hi"] != 0)


def to_flax(name, p):
    """Our parameter tree as flax.linen.LSTMCell's / GRUCell's (see the cells' docstrings)."""
    if name == "lstm":  # Dense ii, if, ig, io without bias; hi, hf, hg, ho with; our c is g
        pairs = {"i": "i", "f": "f", "o": "o", "c": "g"}
        return {**{f"i{k}": {"kernel": p[f"W_x{g}"]} for g, k in pairs.items()},
                **{f"h{k}": {"kernel": p[f"W_h{g}"], "bias": p[f"b_{g}"]}
                   for g, k in pairs.items()}}
    # GRU: Dense ir, iz, in with bias; hr, hz without; hn with (our b_hh); our h~ is n
    pairs = {"r": "r", "z": "z", "h": "n"}
    return {**{f"i{k}": {"kernel": p[f"W_x{g}"], "bias": p[f"b_{g}"]} for g, k in pairs.items()},
            **{f"h{k}": {"kernel": p[f"W_h{g}"]} for g, k in pairs.items()},
            "hn": {"kernel": p["W_hh"], "bias": p["b_hh"]}}


@pytest.mark.parametrize("name", ["gru_reset_after", "lstm"])
def test_weights_copied_to_flax_cells_give_the_same_outputs(name):
    """Our cell and flax.linen's, on the same weights mapped by name, over a sequence with
    padding, in both directions (flax.linen.RNN with keep_order=True for the reverse one)."""
    rng = np.random.default_rng(30)
    B, T, F, H = 3, 5, 3, 4
    lengths = np.array([5, 3, 1])
    flax_cell = {"lstm": flax.linen.LSTMCell, "gru_reset_after": flax.linen.GRUCell}[name](H)
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    carry0 = random_carry(make_cell(name, H), rng, B)
    p = random_params(Recurrent(make_cell(name, H)), rng, x)["params"]["cell"]
    p_flax = to_flax(name, p)
    flax_shapes = jax.eval_shape(flax_cell.init, jax.random.key(0), carry0, x[:, 0])["params"]
    assert jax.tree.map(jnp.shape, p_flax) == jax.tree.map(jnp.shape, flax_shapes)
    assert len(jax.tree.leaves(p_flax)) == len(jax.tree.leaves(p))  # each of ours used once
    valid_BxT = np.arange(T)[None] < lengths[:, None]
    for reverse in (False, True):
        ours = Recurrent(make_cell(name, H), reverse=reverse, return_carry=True)
        carry, y = jit_apply(ours)({"params": {"cell": p}}, x, carry0, seq_lengths=lengths)
        theirs = flax.linen.RNN(flax_cell, reverse=reverse, keep_order=True, return_carry=True)
        ref_carry, ref_y = jax.jit(theirs.apply)({"params": {"cell": p_flax}}, x,
                                                 initial_carry=carry0, seq_lengths=lengths)
        np.testing.assert_allclose(np.asarray(y)[valid_BxT], np.asarray(ref_y)[valid_BxT],
                                   atol=1e-5)
        assert_tree_close(carry, ref_carry, atol=1e-5)


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


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_matches_per_step_jax_values_and_gradients(name):
    """The fused, hoisted scan against `jnp_run` (one step at a time, the textbook equations
    on the separate per-gate parameters), in float32: outputs, final carry, and the gradient
    of a scalar loss with respect to every parameter, the inputs and the initial carry."""
    rng = np.random.default_rng(20)
    B, T, F, H = 2, 4, 3, 5  # F != H, so a transposed kernel cannot pass
    cell = make_cell(name, H)
    model = Recurrent(cell, return_carry=True)
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    carry0 = random_carry(cell, rng, B)
    params = random_params(model, rng, x, carry0)["params"]
    w_y = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)

    def loss_fn(run):
        def loss(params, x, carry0):
            carry, y = run(params, x, carry0)
            value = jnp.sum(w_y * y) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry))
            return value, (carry, y)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    fused = loss_fn(lambda p, x, c: model.apply({"params": p}, x, c))
    naive = loss_fn(lambda p, x, c: jnp_run(name, p["cell"], c, x))
    (value, (carry, y)), grads = fused(params, x, carry0)
    (ref_value, (ref_carry, ref_y)), ref_grads = naive(params, x, carry0)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    assert_tree_close(carry, ref_carry, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    assert_tree_close(grads, ref_grads, rtol=1e-5, atol=1e-5)
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads))  # every parameter is used


@pytest.mark.parametrize("name", ["rnn", "gru_reset_after", "lstm"])
def test_fused_weight_grad_matches_autodiff(name):
    """`fused_weight_grad` on (the hand-written VJP) against off (autodiff of the scan), under
    jit, in two bidirectional layers with padding: both scan directions, the mask, random
    initial carries and gradients coming back through the second layer. Outputs and carries
    are identical (to rounding under grad, which compiles each differently); gradients wrt
    parameters, inputs and initial carries agree to 1e-5."""
    rng = np.random.default_rng(40)
    B, T, F, H = 3, 5, 3, 4
    kwargs = {"gru_reset_after": {"reset_after": True}, "lstm": {"forget_bias": 1.0}}
    make = lambda fused: StackedRecurrent(name[:4].rstrip("_"), H, num_layers=2,
                                          bidirectional=True, fused_weight_grad=fused,
                                          **kwargs.get(name, {}))
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    lengths = jnp.array([5, 3, 0])
    zeros = make(True).initialize_carry(None, (B, F))
    carry0 = jax.tree.map(lambda z: jnp.asarray(rng.normal(size=z.shape), z.dtype), zeros)
    params = random_params(make(True), rng, x)["params"]
    w_y = jnp.asarray(rng.normal(size=(B, T, 2 * H)), jnp.float32)

    def loss_and_grads(fused):
        def loss(params, x, carry0):
            carry, y = make(fused).apply({"params": params}, x, carry0, seq_lengths=lengths)
            value = jnp.sum(w_y * y) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry))
            return value, (carry, y)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
            params, x, carry0)

    apply = lambda fused: jit_apply(make(fused))({"params": params}, x, carry0,
                                                 seq_lengths=lengths)
    assert_tree_close(apply(True), apply(False), rtol=0, atol=0)
    (_, outputs), grads = loss_and_grads(True)
    (_, ref_outputs), ref_grads = loss_and_grads(False)
    assert_tree_close(outputs, ref_outputs, rtol=1e-6, atol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    assert_tree_close(grads, ref_grads, rtol=1e-5, atol=1e-5)
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads))


def test_fused_weight_grad_batch_axes_and_forward_mode():
    """Without padding, over two batch axes, reversed and unrolled: the fused VJP's gradients
    equal autodiff's. As the docstring says, forward mode (jax.jvp) fails with it (for every
    cell but the textbook GRU, which always uses autodiff) and works with
    fused_weight_grad=False; forward-over-reverse (jax.hessian) works and agrees."""
    rng = np.random.default_rng(41)
    x = jnp.asarray(rng.normal(size=(2, 2, 3, 3)), jnp.float32)
    make = lambda fused: Recurrent(LSTMCell(4), reverse=True, unroll=2, fused_weight_grad=fused)
    variables = random_params(make(True), rng, x)
    grad = lambda fused: jax.jit(jax.grad(
        lambda v, x: jnp.sum(jnp.sin(make(fused).apply(v, x))), argnums=(0, 1)))(variables, x)
    assert_tree_close(grad(True), grad(False), rtol=1e-5, atol=1e-5)

    jvp = lambda model, variables: jax.jit(  # lowered, not compiled: the error comes there
        lambda x: jax.jvp(lambda x: model.apply(variables, x), (x,), (x,))).lower(x)
    for name in sorted(CASES):
        model = Recurrent(make_cell(name, 4))
        if name == "gru":
            jvp(model, random_params(model, rng, x))
        else:
            with pytest.raises(TypeError, match="forward-mode"):
                jvp(model, random_params(model, rng, x))
    jvp(make(False), variables)
    hessian = lambda fused: jax.jit(jax.hessian(
        lambda x: jnp.sum(jnp.sin(make(fused).apply(variables, x)))))(x[0, :1])
    np.testing.assert_allclose(hessian(True), hessian(False), rtol=1e-5, atol=1e-5)


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
            carry0_b = jax.tree.map(lambda a, b=b: a[b:b + 1], carry0)
            ref_carry, ref_y = np_run(name, variables["params"]["cell"], carry0_b, prefix)
            np.testing.assert_allclose(y[b:b + 1, :L], ref_y[:, ::-1] if reverse else ref_y,
                                       atol=1e-5)
            assert_tree_close(jax.tree.map(lambda a, b=b: a[b:b + 1], carry), ref_carry,
                              atol=1e-5)


# ----------------------------------------------------------------------------- bidirectional

@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_bidirectional_equals_forward_and_reversed_prefix_by_hand(name):
    """[forward, backward] where the backward half is built by hand for each sequence alone:
    reverse its valid prefix x[:len], run a *forward* Recurrent with the backward cell's
    parameters, reverse the outputs back and pad with zeros. Final carries (both directions,
    from random initial ones) are those of that sequence run alone at its own length."""
    rng = np.random.default_rng(4)
    B, T, F, H = 3, 5, 3, 4
    lengths = np.array([5, 2, 0])
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    fwd, bwd = (Recurrent(make_cell(name, H), reverse=r) for r in (False, True))
    model = Bidirectional(fwd, bwd, return_carry=True)
    carry0 = tuple(random_carry(make_cell(name, H), rng, B) for _ in range(2))
    variables = random_params(model, rng, x, carry0)
    apply = jit_apply(model)
    (carry_f, carry_b), y = apply(variables, x, carry0, seq_lengths=lengths)
    assert y.shape == (B, T, 2 * H)
    pad_BxT = np.arange(T)[None] >= lengths[:, None]
    assert np.all(np.asarray(y)[pad_BxT] == 0)  # exactly zero, both halves

    p = variables["params"]
    run_alone = jit_apply(Recurrent(make_cell(name, H), return_carry=True))
    for b, L in enumerate(lengths):
        take_b = lambda tree, b=b: jax.tree.map(lambda a: a[b:b + 1], tree)
        if L == 0:  # nothing to run: zero outputs, the initial carries untouched
            ref_cf, ref_yf = take_b(carry0[0]), jnp.zeros((1, 0, H))
            ref_cb, ref_yb = take_b(carry0[1]), jnp.zeros((1, 0, H))
        else:
            prefix = x[b:b + 1, :L]
            ref_cf, ref_yf = run_alone({"params": p["forward_rnn"]}, prefix, take_b(carry0[0]))
            ref_cb, ref_yb_rev = run_alone({"params": p["backward_rnn"]}, prefix[:, ::-1],
                                           take_b(carry0[1]))
            ref_yb = ref_yb_rev[:, ::-1]
        ref_y = jnp.pad(jnp.concatenate([ref_yf, ref_yb], -1), ((0, 0), (0, T - L), (0, 0)))
        np.testing.assert_allclose(y[b:b + 1], ref_y, atol=1e-6)
        assert_tree_close(take_b(carry_f), ref_cf, atol=1e-6)
        assert_tree_close(take_b(carry_b), ref_cb, atol=1e-6)

    # Padded inputs change nothing at all.
    x_noise = jnp.where(pad_BxT[..., None], 100.0 * rng.normal(size=x.shape), x)
    assert_tree_close(apply(variables, x_noise, carry0, seq_lengths=lengths),
                      ((carry_f, carry_b), y), rtol=0, atol=0)
    # 'sum' merges the same two halves; the directions are checked.
    summed = Bidirectional(fwd, bwd, merge="sum")  # same tree, outputs only
    y_sum = jit_apply(summed)(variables, x, carry0, seq_lengths=lengths)
    np.testing.assert_allclose(y_sum, y[..., :H] + y[..., H:], atol=1e-6)
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


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_clear_value_errors():
    """Checked before anything is traced or compiled, so these cost no compilation."""
    B, T, F, H = 2, 3, 4, 5
    x = jnp.ones((B, T, F))
    model = Recurrent(LSTMCell(H))
    variables = random_params(model, np.random.default_rng(0), x)
    run = lambda x, **kw: model.apply(variables, x, **kw)
    for lengths, match in [
            (np.array([T + 1, 1]), r"seq_lengths\[0\] = 4 is outside \[0, time\] = \[0, 3\]"),
            (jnp.array([1, -1]), r"seq_lengths\[1\] = -1 is outside"),
            ([1, 2, 3], r"seq_lengths has shape \(3,\); expected the batch shape \(2,\)"),
            (np.array(2), r"seq_lengths has shape \(\); expected the batch shape \(2,\)"),
            (np.array([[1, 2]]), r"shape \(1, 2\); expected the batch shape \(2,\)"),
            (np.array([1.0, 2.0]), "seq_lengths has dtype float64; expected integers")]:
        with pytest.raises(ValueError, match=match):
            run(x, seq_lengths=lengths)
    with pytest.raises(ValueError, match=r"the time axis \(-2\) has length 0"):
        run(jnp.ones((B, 0, F)))
    with pytest.raises(ValueError, match=r"expected \[\*batch, time, features\]"):
        run(jnp.ones((F,)))
    feature_error = r"inputs have 6 features, but its parameter W_xi has shape \(4, 5\)"
    with pytest.raises(ValueError, match=feature_error):
        run(jnp.ones((B, T, 6)))
    cell = LSTMCell(H)  # the single step checks too
    with pytest.raises(ValueError, match=feature_error):
        cell.apply({"params": variables["params"]["cell"]}, cell.initialize_carry(None, (B, 6)),
                   jnp.ones((B, 6)))
    stacked = StackedRecurrent("gru", H, num_layers=2, bidirectional=True)  # errors propagate
    stacked_vars = random_params(stacked, np.random.default_rng(0), x)
    with pytest.raises(ValueError, match="GRUCell at '/layer_0_fwd'.*3 features"):
        stacked.apply(stacked_vars, jnp.ones((B, T, 3)))
    with pytest.raises(ValueError, match="seq_lengths"):
        stacked.apply(stacked_vars, x, seq_lengths=np.array([T, T + 1]))

    # Under jit the lengths are traced, so their values cannot be checked (shape and dtype
    # still are): out-of-range lengths act as if clipped to [0, T].
    jitted = jax.jit(lambda n: run(x, seq_lengths=n))
    np.testing.assert_array_equal(jitted(jnp.array([T + 2, -1])), jitted(jnp.array([T, 0])))
    with pytest.raises(ValueError, match="seq_lengths has shape"):
        jitted(jnp.array([1, 2, 3]))


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
