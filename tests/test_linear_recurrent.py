"""seqjax.nn.linear_recurrent against plain loops: the associative scan against the sequential
one and NumPy, each layer's parallel form against the papers' step-by-step equations (values and
gradients, with padding), token-by-token decoding against the full call, the LRU's eigenvalues,
bad input; and the char LM training with each layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn.linear_recurrent import (
    LRU,
    LinearRecurrentStack,
    MinGRU,
    MinLSTM,
    linear_scan,
    log_linear_scan,
)
from seqjax.train.loop import train_and_evaluate

from conftest import load_config


def _numpy_scan(a, b, h0, reverse=False):
    a, b = np.broadcast_to(np.asarray(a), np.shape(b)), np.asarray(b)
    h, out = np.asarray(h0), np.zeros_like(b)
    steps = range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1])
    for t in steps:
        h = a[:, t] * h + b[:, t]
        out[:, t] = h
    return out


def _coefficients(T, dtype, near_one, seed=0):
    ka, kb, kp, kh = jax.random.split(jax.random.PRNGKey(seed), 4)
    low, high = (0.99, 0.9999) if near_one else (0.0, 0.95)
    a = jax.random.uniform(ka, (2, T, 3), minval=low, maxval=high)
    b = jax.random.normal(kb, (2, T, 3))
    h0 = jax.random.normal(kh, (2, 3))
    if dtype == jnp.complex64:
        a = a * jnp.exp(1j * jax.random.uniform(kp, (2, T, 3), maxval=2 * np.pi))
        b, h0 = b + 1j * jnp.roll(b, 1, -1), h0 - 0.5j * h0
    return a.astype(dtype), b.astype(dtype), h0.astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64])
@pytest.mark.parametrize("near_one", [False, True])
@pytest.mark.parametrize("T", [1, 7, 4096])
def test_associative_scan_equals_sequential_and_numpy(dtype, near_one, T):
    a, b, h0 = _coefficients(T, dtype, near_one)
    scan = jax.jit(linear_scan, static_argnames=("method", "reverse"))
    for reverse in (False, True):
        fast = scan(a, b, h0, reverse=reverse)
        slow = scan(a, b, h0, method="sequential", reverse=reverse)
        tol = dict(rtol=2e-4, atol=2e-4) if near_one and T > 1000 else dict(rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fast, slow, **tol)
        np.testing.assert_allclose(fast, _numpy_scan(a, b, h0, reverse), **tol)

    def loss(method, a, b, h0):
        h = linear_scan(a, b, h0, method=method)
        return jnp.sum(jnp.abs(h) ** 2 * jnp.linspace(0, 1, T)[:, None])

    grads = [jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)(m, a, b, h0)
             for m in ("associative", "sequential")]
    for fast, slow in zip(*grads):
        np.testing.assert_allclose(fast, slow, rtol=1e-3, atol=1e-3 * float(jnp.abs(slow).max()))


def test_log_space_scan_equals_linear_scan_on_positive_coefficients():
    a, b, h0 = _coefficients(300, jnp.float32, near_one=False)
    b, h0 = jnp.abs(b) + 1e-3, jnp.abs(h0)
    for reverse in (False, True):
        np.testing.assert_allclose(log_linear_scan(jnp.log(a), jnp.log(b), h0, reverse=reverse),
                                   linear_scan(a, b, h0, reverse=reverse), rtol=1e-4)


# ----------------------------------------------------------------------------- the layers

def _g(x):
    return np.where(x >= 0, x + 0.5, 1 / (1 + np.exp(-x)))


def _sigmoid(x):
    return 1 / (1 + jnp.exp(-x))


def _min_gru_step(p, h, x, log_space):
    """The paper's sequential minGRU: z = sigmoid(W_z x), h~ = W_h x, h = (1 - z) h + z h~."""
    k, h_tilde = jnp.split(x @ p["W_x"]["kernel"] + p["W_x"]["bias"], 2, -1)
    if log_space:
        h_tilde = jnp.where(h_tilde >= 0, jax.nn.relu(h_tilde) + 0.5, _sigmoid(h_tilde))
    z = _sigmoid(k)
    return (1 - z) * h + z * h_tilde


def _min_lstm_step(p, h, x, log_space):
    """The paper's sequential minLSTM with normalised gates."""
    k_f, k_i, h_tilde = jnp.split(x @ p["W_x"]["kernel"] + p["W_x"]["bias"], 3, -1)
    if log_space:
        h_tilde = jnp.where(h_tilde >= 0, jax.nn.relu(h_tilde) + 0.5, _sigmoid(h_tilde))
    f, i = _sigmoid(k_f), _sigmoid(k_i)
    return f / (f + i) * h + i / (f + i) * h_tilde


def _lru_step(p, x_state, u):
    """The LRU paper's equations: x = lambda x + gamma (B u), with complex B."""
    lam = jnp.exp(-jnp.exp(p["nu_log"]) + 1j * jnp.exp(p["theta_log"]))
    B = p["B_re"] + 1j * p["B_im"]
    return lam * x_state + jnp.exp(p["gamma_log"]) * (u @ B)


def _loop(layer, params, x, lengths):
    """(final state, outputs) of a plain Python loop over time of the layer's equations,
    skipping each sequence's padded steps."""
    p = params["params"]
    B, T, _ = x.shape
    if isinstance(layer, LRU):
        state = jnp.zeros((B, p["nu_log"].shape[0]), jnp.complex64)
        step = lambda s, u: _lru_step(p, s, u)
        C = p["C_re"] + 1j * p["C_im"]
        out = lambda s, u: (s @ C).real + (p["D"] * u if u.shape[-1] == C.shape[-1] else 0)
    else:
        state = jnp.zeros((B, layer.features))
        fn = _min_gru_step if isinstance(layer, MinGRU) else _min_lstm_step
        step = lambda s, u: fn(p, s, u, layer.log_space)
        out = lambda s, u: s
    ys = []
    for t in range(T):
        valid = (t < lengths)[:, None]
        state = jnp.where(valid, step(state, x[:, t]), state)
        ys.append(jnp.where(valid, out(state, x[:, t]), 0.0))
    if isinstance(layer, LRU):
        state = jnp.concatenate([state.real, state.imag], -1)
    return state, jnp.stack(ys, 1)


LAYERS = {
    "minGRU": lambda: MinGRU(5),
    "minGRU log-space": lambda: MinGRU(5, log_space=True),
    "minLSTM": lambda: MinLSTM(5),
    "minLSTM log-space": lambda: MinLSTM(5, log_space=True),
    "LRU": lambda: LRU(5, r_min=0.5, r_max=0.99),
    "LRU F = H": lambda: LRU(4, state_dim=6),
}


@pytest.mark.parametrize("name", LAYERS)
def test_parallel_form_equals_the_papers_loop_with_padding(name):
    layer = LAYERS[name]()
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 9, 4))
    lengths = jnp.array([9, 4, 0])
    params = layer.init(jax.random.PRNGKey(2), x)
    last, y = layer.apply(params, x, seq_lengths=lengths)
    ref_last, ref_y = jax.jit(lambda p: _loop(layer, p, x, lengths))(params)
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(last, ref_last, rtol=1e-4, atol=1e-5)
    assert not np.any(np.asarray(y[1, 4:])) and not np.any(np.asarray(y[2]))

    weights = jax.random.normal(jax.random.PRNGKey(3), y.shape)
    grad = jax.jit(jax.grad(
        lambda p: jnp.sum(layer.apply(p, x, seq_lengths=lengths)[1] * weights)))
    ref_grad = jax.jit(jax.grad(lambda p: jnp.sum(_loop(layer, p, x, lengths)[1] * weights)))
    for a, b in zip(jax.tree.leaves(grad(params)), jax.tree.leaves(ref_grad(params))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", LAYERS)
def test_decoding_token_by_token_equals_the_full_call(name):
    layer = LAYERS[name]()
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 12, 4))
    params = layer.init(jax.random.PRNGKey(5), x)
    last, y = layer.apply(params, x)
    state, ys = layer.initialize_carry(None, (2, 4)), []
    step = jax.jit(layer.apply)
    for t in range(12):
        state, y_t = step(params, x[:, t:t + 1], state)
        ys.append(y_t)
    np.testing.assert_allclose(jnp.concatenate(ys, 1), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, last, rtol=1e-5, atol=1e-5)


def test_reversed_layer_reads_each_sequence_from_its_own_last_token():
    layer = MinGRU(5, reverse=True)
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 8, 4))
    params = layer.init(jax.random.PRNGKey(7), x)
    last, y = layer.apply(params, x, seq_lengths=jnp.array([8, 3]))
    forward = MinGRU(5)
    for row, n in enumerate((8, 3)):
        f_last, f_y = forward.apply(params, x[row:row + 1, :n][:, ::-1])
        np.testing.assert_allclose(y[row, :n], f_y[0, ::-1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(last[row], f_last[0], rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(y[1, 3:]))


def test_lru_eigenvalues_start_on_the_ring_and_stay_inside_the_unit_circle():
    layer = LRU(8, state_dim=2000, r_min=0.4, r_max=0.9)
    params = layer.init(jax.random.PRNGKey(8), jnp.zeros((1, 2, 3)))["params"]
    modulus = np.exp(-np.exp(np.asarray(params["nu_log"])))
    assert modulus.min() >= 0.4 and modulus.max() <= 0.9
    assert abs(np.mean(modulus ** 2) - (0.4 ** 2 + 0.9 ** 2) / 2) < 0.02  # uniform in area
    np.testing.assert_allclose(np.exp(params["gamma_log"]), np.sqrt(1 - modulus ** 2), rtol=1e-5)
    # Any nu_log, however far from the ring: an impulse's state never grows afterwards.
    wild = {"params": dict(params, nu_log=jnp.linspace(-30.0, 30.0, 2000))}
    apply = jax.jit(layer.apply)
    impulse, _ = apply(wild, jax.random.normal(jax.random.PRNGKey(9), (1, 1, 3)))
    after, y = apply(wild, jnp.zeros((1, 300, 3)), impulse)
    modulus = lambda state: np.abs(np.asarray(state[..., :2000] + 1j * state[..., 2000:]))
    assert np.all(modulus(after) <= modulus(impulse) * (1 + 1e-4))  # float32 rounding, 300 steps
    assert np.all(np.isfinite(np.asarray(y)))


@pytest.mark.parametrize("name", ["minGRU", "LRU"])
def test_bad_input_is_a_clear_error(name):
    layer = LAYERS[name]()
    x = jnp.zeros((2, 5, 4))
    params = layer.init(jax.random.PRNGKey(0), x)
    for lengths, match in (([6, 1], "outside"), ([1, 2, 3], "shape")):
        with pytest.raises(ValueError, match=match):
            layer.apply(params, x, seq_lengths=jnp.array(lengths))
    with pytest.raises(ValueError, match="time axis .* has length 0"):
        layer.apply(params, jnp.zeros((2, 0, 4)))
    with pytest.raises(ValueError, match="inputs have 3 features; its parameters were made for 4"):
        layer.apply(params, jnp.zeros((2, 5, 3)))


def test_bidirectional_stack_carries_and_masks():
    stack = LinearRecurrentStack("minlstm", 6, num_layers=2, bidirectional=True)
    x = jax.random.normal(jax.random.PRNGKey(10), (2, 7, 3))
    lengths = jnp.array([7, 2])
    params = stack.init(jax.random.PRNGKey(11), x)
    carries, y = stack.apply(params, x, seq_lengths=lengths)
    assert y.shape == (2, 7, 6) and len(carries) == 2 and len(carries[0]) == 2
    assert not np.any(np.asarray(y[1, 2:]))
    _, y_short = stack.apply(params, x[1:, :2])  # the padded row alone, unpadded
    np.testing.assert_allclose(y[1:, :2], y_short, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["mingru", "minlstm", "lru"])
def test_char_lm_trains_with_each_linear_cell(cell, tmp_path):
    config = load_config("charlm", f"tiny,cell={cell}")
    results = train_and_evaluate(config, str(tmp_path / cell))
    assert results["step"] == 20 and np.isfinite(results["val_perplexity"])
    assert results["val_perplexity"] < 28  # below the uniform guess over the 28 characters


@pytest.mark.parametrize("cls", [MinGRU, MinLSTM])
def test_sequential_method_equals_associative_in_log_space_too(cls):
    x = jax.random.normal(jax.random.PRNGKey(12), (2, 20, 4))
    params = cls(5, log_space=True).init(jax.random.PRNGKey(13), x)
    lengths = jnp.array([20, 6])
    fast = cls(5, log_space=True).apply(params, x, seq_lengths=lengths)
    slow = cls(5, log_space=True, method="sequential").apply(params, x, seq_lengths=lengths)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("context,batch", [(64, 32), (2048, 1), (8192, 1)])
def test_the_long_context_char_lm_keeps_its_characters_per_batch(context, batch):
    from seqjax.tasks import charlm
    config = load_config("charlm", f"cell=mingru,context={context}")
    assert (config.data.num_steps, config.data.batch_size) == (context, batch)
    assert config.data.batch_size * context >= 32 * 64
    charlm.check_config(config)
