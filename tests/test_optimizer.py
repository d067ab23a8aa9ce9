"""The optimiser of `config.opt`: gradient accumulation is one big batch, the schedule and the
logged rate count updates, and AdamW decays matrices but not biases and norm gains."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from seqjax.nn.attention import AdditiveAttention
from seqjax.nn.bert import BertEncoder, BertPretraining
from seqjax.nn.cells import GRUCell
from seqjax.nn.linear_recurrent import LinearRecurrentStack
from seqjax.nn.lm import RecurrentLM
from seqjax.nn.transformer import TransformerLM
from seqjax.train import checks
from seqjax.train.loop import train_and_evaluate
from seqjax.train.optimizer import decay_mask, learning_rate_at, make_optimizer

from conftest import restored


def _opt(**fields):
    opt = dict(name="adamw", lr=0.05, b1=0.9, b2=0.999, momentum=0.0, weight_decay=0.1,
               schedule="cosine", warmup_steps=2, final_lr_fraction=0.1, clip_norm=0.5,
               grad_accum_steps=1, decay_biases_and_norms=False)
    return ml_collections.ConfigDict({**opt, **fields})


class _MLP(nn.Module):
    """Dense, LayerNorm, tanh, Dense: kernels, biases and a norm gain, as a model has."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, name="out")(jnp.tanh(nn.LayerNorm(name="ln")(nn.Dense(8)(x))))[:, 0]


def _regression(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    y = (x @ rng.normal(size=4) + 0.3 * rng.normal(size=rows)).astype(np.float32)
    return x, y


def test_k_micro_steps_are_one_step_of_k_times_the_batch():
    """k micro-steps with the mean-loss gradients of k batches of b rows give, after every
    k-th, the parameters of one step with the gradient of the k*b rows' mean loss (AdamW,
    clipping that acts, warm-up and cosine decay over the updates), and leave them as they
    were in between. float32; equal to rtol 1e-5, atol 1e-6 after 5 updates."""
    k, b, updates = 4, 3, 5
    model = _MLP()
    x, y = _regression(k * b * updates)
    params = model.init(jax.random.PRNGKey(0), x[:1])
    grad = jax.jit(jax.grad(lambda p, x, y: jnp.mean((model.apply(p, x) - y) ** 2)))
    micro = make_optimizer(_opt(grad_accum_steps=k), k * updates)
    whole = make_optimizer(_opt(), updates)
    micro_update, whole_update = jax.jit(micro.update), jax.jit(whole.update)
    micro_params, micro_state = params, micro.init(params)
    whole_params, whole_state = params, whole.init(params)
    clipped = 0
    for u in range(updates):
        rows = slice(u * k * b, (u + 1) * k * b)
        g = grad(whole_params, x[rows], y[rows])
        clipped += optax.tree_utils.tree_norm(g) > 0.5
        change, whole_state = whole_update(g, whole_state, whole_params)
        whole_params = optax.apply_updates(whole_params, change)
        before = micro_params
        for s in range(k):
            rows = slice((u * k + s) * b, (u * k + s + 1) * b)
            change, micro_state = micro_update(grad(micro_params, x[rows], y[rows]),
                                               micro_state, micro_params)
            micro_params = optax.apply_updates(micro_params, change)
            if s < k - 1:
                jax.tree.map(np.testing.assert_array_equal, micro_params, before)
        jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6),
                     micro_params, whole_params)
    assert clipped >= 2  # the clipping is part of what is compared
    moved = jax.tree.map(lambda a, c: float(np.max(np.abs(a - c))), whole_params, params)
    assert min(jax.tree.leaves(moved)) > 1e-3


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_learning_rate_at_a_micro_step_is_that_of_its_update(schedule):
    """At micro-step s the rate reported is that of update s // k, and it is the rate the
    update applies: SGD on a gradient of ones moves a parameter by exactly -lr."""
    k, updates = 3, 6
    opt = _opt(name="sgd", clip_norm=0.0, grad_accum_steps=k, schedule=schedule)
    lr_at = learning_rate_at(opt, k * updates)
    per_update = learning_rate_at(_opt(name="sgd", schedule=schedule), updates)
    assert [lr_at(s) for s in range(k * updates)] == [per_update(s // k)
                                                      for s in range(k * updates)]
    assert per_update(0) == 0.0 and per_update(2) == pytest.approx(0.05)  # 2 warm-up updates
    tx = make_optimizer(opt, k * updates)
    params = {"w": jnp.zeros(())}
    state, update = tx.init(params), jax.jit(tx.update)
    for s in range(k * updates):
        change, state = update({"w": jnp.ones(())}, state, params)
        expected = -lr_at(s) if s % k == k - 1 else 0.0
        assert float(change["w"]) == pytest.approx(expected, rel=1e-6, abs=1e-9)


# Every parameter name of the models below, and whether AdamW decays it.
DECAYED = {"kernel": True, "embedding": True, "P": True, "w_v": True, "B_re": True,
           "B_im": True, "C_re": True, "C_im": True,
           "bias": False, "scale": False, "nu_log": False, "theta_log": False,
           "gamma_log": False, "D": False}


def _names(params):
    return [(jax.tree_util.keystr(path), str(path[-1].key))
            for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def _model_params(name):
    tokens = jnp.zeros((2, 6), jnp.int32)
    key = jax.random.PRNGKey(0)
    if name == "transformer":
        model = TransformerLM(30, num_layers=1, d_model=8, num_heads=2, ffn_hiddens=16,
                              max_length=8, position="learned")
        return model.init(key, tokens)
    if name == "bert":
        encoder = BertEncoder(30, num_layers=1, d_model=8, num_heads=2, ffn_hiddens=16,
                              max_length=8)
        return BertPretraining(encoder).init(key, tokens, positions_BxP=tokens[:, :2])
    if name == "lstm":
        return RecurrentLM(30, cell="lstm", hidden=8, num_layers=2, embed_dim=4).init(key, tokens)
    if name == "gru_reset_after":
        x = jnp.zeros((2, 3))
        return GRUCell(4, reset_after=True).init(key, jnp.zeros((2, 4)), x)
    if name == "lru":
        return LinearRecurrentStack("lru", 8, num_layers=1).init(key, jnp.zeros((2, 6, 5)))
    if name == "additive_attention":
        q = jnp.zeros((2, 3, 4))
        return AdditiveAttention(6).init(key, q, q, q)
    raise ValueError(name)


@pytest.mark.parametrize("name", ["transformer", "bert", "lstm", "gru_reset_after", "lru",
                                  "additive_attention"])
def test_decay_mask_of_real_models(name):
    """Kernels, embeddings and the other matrices are decayed; every bias ('bias' and the
    cells' 'b_*'), LayerNorm scale and the LRU's diagonal parameters are not. A parameter name
    missing from the table fails the test: a new kind of parameter needs a decision."""
    params = _model_params(name)
    mask = decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    seen = set()
    for (path, leaf), decayed in zip(_names(params), jax.tree.leaves(mask)):
        kind = "bias" if leaf.startswith("b_") else "kernel" if leaf.startswith("W_") else leaf
        assert kind in DECAYED, f"{path}: no decision for parameter {leaf!r}"
        assert decayed is DECAYED[kind], path
        seen.add(kind)
    assert "kernel" in seen and ("bias" in seen or name == "additive_attention")
    if name in ("transformer", "bert", "lru"):
        assert "scale" in seen
    if name in ("gru_reset_after", "lstm"):
        assert any(leaf.startswith("b_") for _, leaf in _names(params))
    if name == "gru_reset_after":
        assert "b_hh" in [leaf for _, leaf in _names(params)]


def _bert_params():
    rng = np.random.default_rng(0)
    params = _model_params("bert")
    return jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(a.dtype), params)


@pytest.mark.parametrize("accum", [1, 2])
def test_zero_gradients_decay_only_kernels(accum):
    """With zero gradients Adam's step is 0, so one AdamW update is the decay alone: kernels
    and embeddings shrink by (1 - lr*wd), biases and LayerNorm scales keep their values; with
    `decay_biases_and_norms` everything shrinks."""
    lr, wd = 0.1, 0.5
    params = _bert_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    for everything in (False, True):
        opt = _opt(lr=lr, weight_decay=wd, schedule="constant", warmup_steps=0,
                   grad_accum_steps=accum, decay_biases_and_norms=everything)
        tx = make_optimizer(opt, 10)
        state, update = tx.init(params), jax.jit(tx.update)
        for _ in range(accum):
            change, state = update(zeros, state, params)
            new = optax.apply_updates(params, change)
        for (path, leaf), a, b in zip(_names(params), jax.tree.leaves(params),
                                      jax.tree.leaves(new)):
            if everything or leaf in ("kernel", "embedding", "P"):
                np.testing.assert_allclose(b, a * (1 - lr * wd), rtol=1e-6, err_msg=path)
            else:
                assert leaf in ("bias", "scale"), path
                np.testing.assert_array_equal(b, a, err_msg=path)


def test_masked_adamw_is_optax_with_a_mask_and_keeps_the_state_of_one_without():
    """The updates are optax.adamw(mask=decay_mask)'s; the state's tree is that of
    optax.adamw without a mask (the state of every run saved before the switch), which
    optax's own mask would change (an optax.masked node that orbax will not restore into)."""
    params = _bert_params()
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), params)
    opt = _opt(clip_norm=0.0, schedule="constant", warmup_steps=0)
    ours = make_optimizer(opt, 10)
    lr = optax.constant_schedule(opt.lr)
    theirs = optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                         mask=decay_mask)
    unmasked = optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
    state, their_state = ours.init(params), theirs.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(unmasked.init(params))
    assert jax.tree.structure(their_state) != jax.tree.structure(state)
    for _ in range(3):
        change, state = ours.update(grads, state, params)
        their_change, their_state = theirs.update(grads, their_state, params)
        jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-9),
                     change, their_change)
        params = optax.apply_updates(params, change)


def test_decay_switch_is_a_bool_and_absent_means_decay_everything():
    config = ml_collections.ConfigDict(dict(
        num_train_steps=2, log_every=1, eval_every=1, checkpoint_every=1, keep_checkpoints=1,
        seed=0, num_devices=0, opt=_opt(decay_biases_and_norms=1, schedule="constant",
                                        warmup_steps=0).to_dict()))
    with pytest.raises(TypeError, match="config.opt.decay_biases_and_norms=1 has type int"):
        checks.check_config(config)
    fields = config.opt.to_dict()
    del fields["decay_biases_and_norms"]
    config.opt = fields
    checks.check_config(config)  # a config written before the switch
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
              "ln": {"scale": jnp.ones(2)}}
    tx = make_optimizer(config.opt, 10)
    change, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert all(float(jnp.min(jnp.abs(c))) > 0 for c in jax.tree.leaves(change))


def test_steps_that_no_update_would_apply_are_refused():
    config = ml_collections.ConfigDict(dict(
        num_train_steps=10, log_every=1, eval_every=1, checkpoint_every=1, keep_checkpoints=1,
        seed=0, num_devices=0, opt=_opt(grad_accum_steps=4, schedule="constant",
                                        warmup_steps=0).to_dict()))
    with pytest.raises(ValueError, match="config.num_train_steps=10: must be a multiple of "
                                         "opt.grad_accum_steps=4"):
        checks.check_config(config)
    config.num_train_steps = 12
    checks.check_config(config)


def test_switch_changes_on_resume_and_an_old_workdir_without_it_resumes(tiny_charlm, tmp_path):
    """The switch leaves the optimizer state's tree as it is, so a workdir resumes whatever
    its value was, including one whose config.json predates it (its checkpoints were written
    by optax.adamw without a mask)."""
    workdir = tmp_path / "w"
    config = tiny_charlm
    config.opt.weight_decay = 0.1
    config.opt.decay_biases_and_norms = True
    config.num_train_steps = 4
    train_and_evaluate(config, str(workdir))
    saved = json.loads((workdir / "config.json").read_text())
    del saved["opt"]["decay_biases_and_norms"]
    (workdir / "config.json").write_text(json.dumps(saved))
    before = restored(workdir)["params"]
    config.opt.decay_biases_and_norms = False
    config.num_train_steps = 6
    assert train_and_evaluate(config, str(workdir))["step"] == 6
    config.opt.decay_biases_and_norms = True
    config.num_train_steps = 8
    assert train_and_evaluate(config, str(workdir))["step"] == 8
    assert not (workdir / "damaged").exists()
    after = restored(workdir)
    assert int(after["step"]) == 8
    assert jax.tree.structure(after["params"]) == jax.tree.structure(before)
