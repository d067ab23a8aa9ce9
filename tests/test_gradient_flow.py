"""The gradient-flow analysis: its measurements against naive references, and a tiny run."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax import config as config_lib
from seqjax.analysis import gradient_flow as gf
from seqjax.nn import initializers
from seqjax.nn.lm import RecurrentLM
from seqjax.tasks import charlm
from seqjax.train import loop

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


@pytest.mark.parametrize("cell", ["mingru", "lru"])
def test_linear_cells_have_nothing_to_scale(cell):
    model = RecurrentLM(5, cell=cell, hidden=3)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    unscaled = gf.scale_recurrent(params, 1.0)
    jax.tree.map(np.testing.assert_array_equal, unscaled, params)
    with pytest.raises(ValueError, match="no recurrent matrix"):
        gf.scale_recurrent(params, 2.0)


def test_lru_eigenvalues_match_numpy():
    nu_log, theta_log = np.array([-3.0, -1.0, 0.5]), np.array([-2.0, 0.0, 1.5])
    params = {"params": {"rnn": {
        "input": {"kernel": np.ones((2, 3))},
        "block_0": {"nu_log": nu_log, "theta_log": theta_log, "gamma_log": np.zeros(3)},
        "block_1_fwd": {"nu_log": nu_log[:2], "theta_log": theta_log[:2]},
        "block_1_norm": {"scale": np.ones(3)}}}}
    found = gf.lru_eigenvalues(params)
    assert sorted(found) == ["rnn/block_0", "rnn/block_1_fwd"]
    modulus, phase = np.exp(-np.exp(nu_log)), np.exp(theta_log)
    np.testing.assert_allclose(found["rnn/block_0"],
                               modulus * (np.cos(phase) + 1j * np.sin(phase)), rtol=1e-6)
    np.testing.assert_allclose(found["rnn/block_1_fwd"], found["rnn/block_0"][:2])
    assert gf.lru_eigenvalues({"params": {"head": {"kernel": np.ones(2)}}}) == {}


def test_initial_params_are_those_training_starts_from(tmp_path, tiny_charlm):
    lm = config_lib.override(tiny_charlm, {"model.cell": "lru"})
    task = charlm.build(lm, str(tmp_path))
    state, _ = loop._fresh_state(lm, str(tmp_path), task, optax.identity())
    jax.tree.map(np.testing.assert_array_equal, gf.initial_params(task, lm), state["params"])


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
    assert {"mingru", "minlstm", "lru"} <= set(config.cells)  # the default
    config.cells = ("rnn", "mingru", "lru")
    config.lru_rings = ((0.0, 0.5), (0.9, 0.999))
    summary = gf.run(config, str(tmp_path))
    for name in ("gradient_flow.csv", "gradient_flow.png", "lru_eigenvalues.csv",
                 "lru_eigenvalues.png", "clipping.csv", "clipping.png", "symmetry.csv",
                 "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert summary["symmetry_constant_max_unit_difference"] < 1e-6  # float32 rounding
    assert summary["symmetry_random_max_unit_difference"] > 0.1

    with open(tmp_path / "gradient_flow.csv") as f:
        rows = list(csv.DictReader(f))
    row_sets = {(r["cell"], r["state"], r["recurrent_scale"], r["r_min"], r["r_max"])
                for r in rows}
    assert row_sets == {
        *(("rnn", "init", str(s), "", "") for s in config.recurrent_scales),
        ("rnn", "trained", "1.0", "", ""),
        ("mingru", "init", "1.0", "", ""), ("mingru", "trained", "1.0", "", ""),
        ("lru", "init", "1.0", "0.0", "0.5"), ("lru", "init", "1.0", "0.9", "0.999"),
        ("lru", "trained", "1.0", "0.9", "0.999")}
    assert len(rows) == len(row_sets) * config.seq_len
    # Smaller recurrent weights make gradients vanish faster, at initialisation; so do
    # eigenvalues further inside the unit circle.
    rates = [summary[f"rnn_init_x{s:g}_rate"] for s in config.recurrent_scales]
    assert rates == sorted(rates)
    assert summary["lru_init_ring0-0.5_rate"] < summary["lru_init_ring0.9-0.999_rate"]
    for key in ("mingru_init_x1", "mingru_trained_x1", "lru_trained_x1"):
        assert 0 < summary[f"{key}_rate"] < 1

    with open(tmp_path / "lru_eigenvalues.csv") as f:
        eigen = list(csv.DictReader(f))
    assert list(eigen[0]) == ["layer", "when", "modulus", "phase"]
    assert {r["layer"] for r in eigen} == {"rnn/block_0"}
    lin = config.lm.model.linear
    for when in ("init", "trained"):
        moduli = [float(r["modulus"]) for r in eigen if r["when"] == when]
        assert len(moduli) == config.lm.model.hidden and max(moduli) < 1
        if when == "init":
            assert all(lin.r_min <= m <= lin.r_max for m in moduli)
    assert all(-np.pi <= float(r["phase"]) <= np.pi for r in eigen)


def test_bad_config_is_a_clear_error(tmp_path):
    config = load_config("gradient_flow", "tiny")
    config.cells = ("rnn", "transformer")
    with pytest.raises(ValueError, match="config.cells"):
        gf.run(config, str(tmp_path / "w"))
    config = load_config("gradient_flow", "tiny")
    config.lru_rings = ((0.5, 0.2),)
    with pytest.raises(ValueError, match="config.lru_rings"):
        gf.run(config, str(tmp_path / "w"))
    config = load_config("gradient_flow", "tiny")
    config.lm.model.linear.r_max = 1.5
    with pytest.raises(ValueError, match="config.model.linear.r_max"):
        gf.run(config, str(tmp_path / "w"))
    config = load_config("gradient_flow", "tiny")
    config.lm.model.init.recurrent = "orthogonal:big"
    with pytest.raises(ValueError, match="config.model.init.recurrent"):
        gf.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
