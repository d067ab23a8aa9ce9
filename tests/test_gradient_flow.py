"""The gradient-flow analysis: its measurements against naive references, and a tiny run."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax.analysis import gradient_flow as gf
from seqjax.nn import initializers
from seqjax.nn.lm import RecurrentLM

from conftest import load_config


@pytest.mark.parametrize("cell, embed_dim", [("rnn", 0), ("lstm", 3)])
def test_input_gradient_norms_match_finite_differences(cell, embed_dim):
    V, T, B = 5, 6, 2
    model = RecurrentLM(V, cell=cell, hidden=4, embed_dim=embed_dim)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T + 1), 0, V)
    params = model.init(jax.random.PRNGKey(0), tokens[:, :T])
    norms = gf.input_gradient_norms(model, params, tokens)

    x = np.asarray(gf.input_vectors(model, params, tokens[:, :T]), np.float64)

    def loss(x_BxTxF):
        logits, _ = model.apply(params, jnp.asarray(x_BxTxF, jnp.float32),
                                method=model.logits_from_inputs)
        return float(
            optax.softmax_cross_entropy_with_integer_labels(logits[:, -1], tokens[:, T]).sum())

    eps = 1e-2
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (loss(x + step) - loss(x - step)) / (2 * eps)
    expected = np.linalg.norm(grad, axis=-1).mean(0)[::-1]
    np.testing.assert_allclose(norms, expected, rtol=2e-2, atol=1e-5)
    assert norms.shape == (T,)


def test_geometric_rate_and_recurrent_scaling():
    assert gf.geometric_rate(3.0 * 0.8 ** np.arange(50)) == pytest.approx(0.8)
    assert gf.geometric_rate(2.0 * 1.1 ** np.arange(50)) == pytest.approx(1.1)
    model = RecurrentLM(5, cell="gru", hidden=3)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    scaled = gf.scale_recurrent(params, 2.0)
    layer, scaled_layer = params["params"]["rnn"]["layer_0"], scaled["params"]["rnn"]["layer_0"]
    for name in layer:
        factor = 2.0 if name.startswith("W_h") else 1.0
        np.testing.assert_array_equal(scaled_layer[name], factor * layer[name])
    np.testing.assert_array_equal(scaled["params"]["head"]["kernel"],
                                  params["params"]["head"]["kernel"])


def test_unit_spread_sees_every_per_unit_weight():
    model = RecurrentLM(5, cell="rnn", hidden=3, kernel_init=initializers.from_spec("constant:0.1"),
                        recurrent_init=initializers.from_spec("constant:0.1"),
                        head_init=initializers.from_spec("constant:0.1"))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    assert gf.unit_spread(params) == 0.0
    for path in (("rnn", "layer_0", "W_hh"), ("rnn", "layer_0", "b_h"), ("head", "kernel")):
        bumped = jax.tree.map(lambda x: x, params)
        target = bumped["params"]
        for key in path[:-1]:
            target = target[key]
        w = np.array(target[path[-1]])
        w[-1] += 0.5  # the last unit's row (or entry)
        target[path[-1]] = w
        assert gf.unit_spread(bumped) == pytest.approx(0.5)


def test_initializer_specs():
    key = jax.random.PRNGKey(0)
    assert np.all(initializers.from_spec("constant:0.5")(key, (3, 2)) == 0.5)
    w = initializers.from_spec("normal:0.01")(key, (400, 400))
    assert float(jnp.std(w)) == pytest.approx(0.01, rel=0.02)
    q = initializers.from_spec("orthogonal:2.0")(key, (8, 8))
    np.testing.assert_allclose(q.T @ q, 4.0 * np.eye(8), atol=1e-5)
    for bad, message in (("normal", "needs a value"), ("normal:x", "not a number"),
                         ("gaussian", "unknown initialiser"), (0.1, "expected a string")):
        with pytest.raises((ValueError, TypeError), match=message):
            initializers.from_spec(bad)


def test_tiny_run_writes_every_result(tmp_path):
    config = load_config("gradient_flow", "tiny")
    config.cells = ("rnn", "lstm")
    summary = gf.run(config, str(tmp_path))
    for name in ("gradient_flow.csv", "gradient_flow.png", "clipping.csv", "clipping.png",
                 "symmetry.csv", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "gradient_flow.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (len(config.recurrent_scales) + 1) * config.seq_len
    assert summary["symmetry_constant_max_unit_difference"] < 1e-6  # float32 rounding
    assert summary["symmetry_random_max_unit_difference"] > 0.1
    # Smaller recurrent weights make gradients vanish faster, at initialisation.
    rates = [summary[f"rnn_init_x{s:g}_rate"] for s in config.recurrent_scales]
    assert rates == sorted(rates)


def test_bad_config_is_a_clear_error(tmp_path):
    config = load_config("gradient_flow", "tiny")
    config.cells = ("rnn", "transformer")
    with pytest.raises(ValueError, match="config.cells"):
        gf.run(config, str(tmp_path / "w"))
    config = load_config("gradient_flow", "tiny")
    config.lm.model.init.recurrent = "orthogonal:big"
    with pytest.raises(ValueError, match="config.model.init.recurrent"):
        gf.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
