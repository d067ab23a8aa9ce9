"""Mixed precision, rematerialisation and the fused attention implementations.

- bfloat16 computation (float32 parameters) trains every shipped experiment along the float32
  run's loss curve;
- `remat` changes memory, not results: the same parameters and the same gradients;
- `attention_impl='xla'` (jax.nn.dot_product_attention) equals seqjax's own attention with
  every mask kind, and 'auto' is seqjax's own where cuDNN does not run (here, a CPU).
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax import tasks
from seqjax.nn import compute
from seqjax.nn.attention import MultiHeadAttention, fused_attention
from seqjax.nn.bert import BertEncoder, BertPretraining
from seqjax.nn.lm import RecurrentLM
from seqjax.nn.recurrent import StackedRecurrent
from seqjax.nn.transformer import (
    EncoderDecoder,
    TransformerDecoder,
    TransformerEncoder,
    TransformerLM,
)
from seqjax.tasks import charlm, charlm_transformer

from conftest import load_config

# ------------------------------------------------------------------------------ bfloat16 runs

# (experiment, argument) of every shipped experiment that trains a model, at its test size.
EXPERIMENTS = [("charlm", f"tiny,cell={cell}")
               for cell in ("lstm", "gru", "rnn", "mingru", "minlstm", "lru")] + [
    ("charlm_transformer", "tiny"), ("translate", "tiny"),
    ("translate", "tiny,model=seq2seq_attention"), ("bert_pretrain", "smoke"),
    ("bert_finetune", "smoke")]
STEPS = 20
# bfloat16 keeps 8 significant bits: one rounding moves a value by at most 2^-9 = 0.2%. The loss
# is a mean over every predicted token, so the roundings of its terms mostly cancel, and the
# float32 parts (softmax, norms' statistics, logits, the loss, the optimizer) add none: at a
# step, the two runs differ by the drift of their parameters, which Adam's normalised updates
# keep to a few roundings' worth. Measured over 20 steps: at most 0.06% for the char LMs and
# translation models, 0.07% for BERT pretraining, 0.29% for BERT fine-tuning (its loss is a
# mean over 8 sequences only); 3% is ten times the largest, room for other CPUs' arithmetic.
# Which products stay float32 is checked on the jaxprs below, not by this tolerance.
LOSS_RTOL = 0.03
FIT_STEPS = 8


def _loss_curve(task, steps: int, fit_steps: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Training losses of `steps` Adam steps on the task's batches, one device, then of
    `fit_steps` more steps on the first batch alone (same dropout key each time)."""
    tx = optax.adam(3e-3)
    params = task.init_params(jax.random.PRNGKey(0))
    carry = jax.tree.map(jnp.asarray, task.init_carry(task.batch_size))

    @jax.jit
    def step(params, opt_state, batch, carry, rng):
        def mean_loss(p):
            sums, new_carry = task.loss(p, batch, carry, rng=rng, train=True)
            return sums["loss"] / sums["weight"], new_carry

        (loss, carry), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, carry, loss

    opt_state, losses = tx.init(params), []
    first_carry = carry
    for s in range(steps):
        params, opt_state, carry, loss = step(params, opt_state, task.train_batch(s), carry,
                                              jax.random.PRNGKey(s))
        losses.append(float(loss))
    fit_losses = []
    for _ in range(fit_steps):
        params, opt_state, _, loss = step(params, opt_state, task.train_batch(0), first_carry,
                                          jax.random.PRNGKey(0))
        fit_losses.append(float(loss))
    return np.array(losses), np.array(fit_losses)


@pytest.mark.parametrize("name,arg", EXPERIMENTS)
def test_bfloat16_trains_along_the_float32_curve(name, arg, tmp_path):
    config = load_config(name, arg)
    f32 = tasks.build(config, None)
    for file, text in f32.files.items():  # the same vocabulary or tokenizer for both runs
        (tmp_path / file).write_text(text, encoding="utf-8")
    config.model.dtype = "bfloat16"
    bf16 = tasks.build(config, str(tmp_path))
    float32_losses, _ = _loss_curve(f32, STEPS)
    bfloat16_losses, fit_losses = _loss_curve(bf16, STEPS, FIT_STEPS)
    assert np.all(np.isfinite(bfloat16_losses))
    np.testing.assert_allclose(bfloat16_losses, float32_losses, rtol=LOSS_RTOL)
    # It learns: on one batch, every step lowers the loss. (Over 20 different batches the loss
    # of BERT fine-tuning, a mean over 8 sentences, moves more with the batch than it falls.)
    assert np.all(np.diff(fit_losses) < 0), fit_losses


@pytest.mark.parametrize("name,arg", [("charlm_transformer", "tiny"), ("bert_pretrain", "smoke"),
                                      ("charlm", "tiny")])
def test_bfloat16_runs_products_in_bfloat16_and_logits_in_float32(name, arg):
    """Parameters stay float32; the layers' products run in bfloat16; the head's product (the
    last in the model) comes out in float32, as does the loss."""
    config = load_config(name, arg)
    config.model.dtype = "bfloat16"
    task = tasks.build(config, None)
    params = task.init_params(jax.random.PRNGKey(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    carry = jax.tree.map(jnp.asarray, task.init_carry(task.batch_size))
    loss = lambda p: task.loss(p, task.train_batch(0), carry, rng=jax.random.PRNGKey(1),
                               train=True)[0]["loss"]
    closed = jax.make_jaxpr(loss)(params)
    text = str(closed)
    assert "bf16[" in text and "dot_general" in text
    float32_out = [eqn.outvars[0].aval.dtype == jnp.float32 for eqn in closed.jaxpr.eqns
                   if eqn.primitive.name == "dot_general"]
    assert float32_out and not all(float32_out)  # bfloat16 products ...
    assert float32_out[-1]  # ... and a float32 head
    assert jax.eval_shape(loss, params).dtype == jnp.float32


@pytest.mark.parametrize("key,value", [("model.dtype", "float16"),
                                       ("model.param_dtype", "float16"),
                                       ("model.dtype", "float64"), ("model.remat", "blocks")])
def test_unsupported_precision_settings_are_refused_by_key(key, value):
    config = load_config("charlm_transformer", "tiny")
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ValueError, match=f"config.{key}='{value}'"):
        charlm_transformer.check_config(config)


def test_float16_is_refused_with_the_reason():
    config = load_config("charlm", "tiny")
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match="loss scaling"):
        charlm.check_config(config)


# ------------------------------------------------------------------------------ remat

def _grads(model, variables, loss_of_output, *inputs):
    def loss(params):
        out = model.apply({"params": params}, *inputs)
        return loss_of_output(out)
    return jax.grad(loss)(variables["params"])


def _assert_same_gradients(make, inputs, loss_of_output, remats=("block", "full")):
    """Same parameter tree and, to float rounding (relative to the largest gradient: some, such
    as attention's key biases, are rounding noise around 0), the same gradients for every
    `remat`."""
    reference = make("none")
    variables = reference.init(jax.random.PRNGKey(0), *inputs)
    expected = _grads(reference, variables, loss_of_output, *inputs)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected))
    for remat in remats:
        model = make(remat)
        fresh = model.init(jax.random.PRNGKey(0), *inputs)
        assert jax.tree.structure(fresh) == jax.tree.structure(variables)
        got = _grads(model, variables, loss_of_output, *inputs)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


def _tokens(shape, vocab=13, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


def _sum_squares(out):
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(out)
               if jnp.issubdtype(x.dtype, jnp.floating))


STACK = dict(num_layers=2, d_model=16, num_heads=2, ffn_hiddens=32, max_length=16)


@pytest.mark.parametrize("attention", ["full", "local"])
def test_remat_keeps_the_transformer_lm_gradients(attention):
    make = lambda remat: TransformerLM(13, **STACK, attention=attention, block_size=4,
                                       look_back=1, remat=remat)
    _assert_same_gradients(make, (_tokens((2, 16)),), _sum_squares,
                           remats=("block", "full", "dots_saveable"))


def test_remat_keeps_the_encoder_decoder_gradients():
    make = lambda remat: EncoderDecoder(TransformerEncoder(13, **STACK, remat=remat),
                                        TransformerDecoder(11, **STACK, remat=remat))
    inputs = (_tokens((2, 10)), jnp.array([10, 6]), _tokens((2, 7), 11, seed=2))
    _assert_same_gradients(make, inputs, _sum_squares)


def test_remat_keeps_the_bert_gradients():
    make = lambda remat: BertPretraining(BertEncoder(13, num_layers=2, d_model=16, num_heads=2,
                                                     ffn_hiddens=32, max_length=16,
                                                     remat=remat))
    L = 12
    inputs = (_tokens((2, L)), jnp.zeros((2, L), jnp.int32),
              jnp.arange(L)[None] < jnp.array([[L], [7]]))
    _assert_same_gradients(make, inputs, _sum_squares)


@pytest.mark.parametrize("cell", ["lstm", "gru", "mingru", "lru"])
def test_remat_keeps_the_recurrent_lm_gradients(cell):
    make = lambda remat: RecurrentLM(13, cell=cell, hidden=8, num_layers=2, remat=remat)
    _assert_same_gradients(make, (_tokens((2, 9)),), lambda out: _sum_squares(out[0]))


class _WithLengths(nn.Module):
    stack: nn.Module

    def __call__(self, x, lengths):
        return self.stack(x, seq_lengths=lengths)


def test_remat_keeps_a_bidirectional_stack_with_lengths():
    x = jax.random.normal(jax.random.PRNGKey(3), (3, 7, 5))
    make = lambda remat: _WithLengths(StackedRecurrent("gru", 6, num_layers=2,
                                                       bidirectional=True, remat=remat))
    _assert_same_gradients(make, (x, jnp.array([7, 4, 1])), _sum_squares)


def _residual_bytes(f, *args) -> int:
    """Bytes the backward pass of `f` keeps from its forward pass: the arrays its VJP closes
    over (parameters included)."""
    _, vjp = jax.vjp(f, *args)
    return sum(x.nbytes for x in jax.tree.leaves(vjp))


def test_remat_keeps_less_for_the_backward_pass():
    """What a backward pass keeps, whatever a backend's scheduler later does with it: 'block'
    drops the attention weights and activations, 'full' everything but each block's input."""
    L, B = 128, 4
    tokens, mask = _tokens((B, L), 50), jnp.ones((B, L), bool)

    def kept(remat):
        model = BertPretraining(BertEncoder(50, num_layers=4, d_model=64, num_heads=4,
                                            ffn_hiddens=256, max_length=L, remat=remat,
                                            dropout_rate=0.0, attention_dropout_rate=0.0))
        params = model.init(jax.random.PRNGKey(0), tokens, None, mask)["params"]
        return _residual_bytes(lambda p: _sum_squares(model.apply({"params": p}, tokens, None,
                                                                  mask)), params)

    none, block, full = (kept(r) for r in ("none", "block", "full"))
    assert block < 0.3 * none and full < 0.6 * block, (none, block, full)


def test_remat_names_a_policy_or_is_refused():
    assert compute.remat(TransformerLM, "none") is TransformerLM
    with pytest.raises(ValueError, match="remat='sometimes'"):
        compute.remat(TransformerLM, "sometimes")


# ------------------------------------------------------------------------------ attention impls

def _qkv(B=2, Q=6, K=6, H=2, D=8, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(keys[0], (B, Q, H, D)), jax.random.normal(keys[1], (B, K, H, D)),
            jax.random.normal(keys[2], (B, K, H, D)))


MASKS = {
    "none": lambda B, K: None,
    "padding": lambda B, K: jnp.arange(K)[None] < jnp.array([K, 3])[:, None],
    "padding_with_an_empty_row": lambda B, K: jnp.arange(K)[None] < jnp.array([4, 0])[:, None],
}


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("causal,cross", [(False, False), (True, False), (False, True)])
def test_xla_attention_equals_seqjax_attention(mask, causal, cross):
    B, Q, K, E = 2, 6, 9 if cross else 6, 16
    x_q = jax.random.normal(jax.random.PRNGKey(1), (B, Q, E))
    x_kv = jax.random.normal(jax.random.PRNGKey(2), (B, K, E)) if cross else None
    key_mask = MASKS[mask](B, K)
    make = lambda impl: MultiHeadAttention(num_heads=2, causal=causal, attention_impl=impl)
    params = make("seqjax").init(jax.random.PRNGKey(0), x_q, x_kv, mask=key_mask)

    def run(impl):
        def f(params, x_q, x_kv):
            return make(impl).apply(params, x_q, x_kv, mask=key_mask)
        out, vjp = jax.vjp(f, params, x_q, x_kv)
        return out, vjp(jnp.cos(out))

    (expected, expected_grads), (got, got_grads) = run("seqjax"), run("xla")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("runs,dropout,weights,expected", [
    (False, 0.0, False, "seqjax"), (True, 0.0, False, "cudnn"), (True, 0.1, False, "seqjax"),
    (True, 0.0, True, "seqjax")])
def test_auto_attention_picks_cudnn_only_where_it_runs(monkeypatch, runs, dropout, weights,
                                                       expected):
    """'auto': cuDNN where it runs (faked here), else seqjax's own: with attention dropout,
    or when the weights are asked for ('intermediates' mutable)."""
    import seqjax.nn.attention as attention
    calls = []
    monkeypatch.setattr(attention, "cudnn_runs", lambda dtype, head_dim: runs)
    monkeypatch.setattr(attention, "fused_attention",
                        lambda q, k, v, implementation, **kw: calls.append(implementation) or q)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 16)).astype(jnp.bfloat16)
    model = MultiHeadAttention(num_heads=2, causal=True, attention_impl="auto",
                               dropout_rate=dropout, dtype=jnp.bfloat16)
    params = model.init(jax.random.PRNGKey(0), x)
    calls.clear()
    model.apply(params, x, mutable=["intermediates"] if weights else False)
    assert calls == ([] if expected == "seqjax" else [expected])


def test_cudnn_attention_where_it_cannot_run_is_refused_by_key():
    config = load_config("charlm_transformer", "tiny")
    config.model.attention_impl = "cudnn"
    with pytest.raises(ValueError, match="config.model.attention_impl='cudnn': needs an NVIDIA"):
        charlm_transformer.check_config(config)


def test_fused_attention_function_matches_its_reference_with_lengths():
    q, k, v = _qkv(K=6)
    lengths = jnp.array([6, 2])
    key_mask = jnp.arange(6)[None] < lengths[:, None]
    from seqjax.nn.attention import dot_product_attention
    expected = dot_product_attention(q, k, v, key_mask[:, None, None, :])
    got = fused_attention(q, k, v, implementation="xla", key_mask_BxK=key_mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "cudnn"])
def test_fused_attention_with_attention_dropout_is_refused_by_key(impl):
    config = load_config("charlm_transformer", "tiny")
    config.model.attention_impl = impl
    config.model.attention_dropout = 0.1
    with pytest.raises(ValueError, match="config.model.attention_impl"):
        charlm_transformer.check_config(config)
    config.model.attention_impl = "everywhere"
    config.model.attention_dropout = 0.0
    with pytest.raises(ValueError, match="config.model.attention_impl='everywhere'"):
        charlm_transformer.check_config(config)


def test_attention_scores_are_a_float32_product():
    """The score products themselves run to float32 (not a bfloat16 product cast afterwards):
    scaled dot-product and additive scores."""
    q, k, _ = (x.astype(jnp.bfloat16) for x in _qkv())
    from seqjax.nn.attention import additive_scores, dot_product_weights
    for f, args in ((dot_product_weights, (q, k)),
                    (additive_scores, (q[:, :, 0], k[:, :, 0], k[0, 0, 0]))):
        jaxpr = jax.make_jaxpr(f)(*args).jaxpr
        dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
        assert dots and all(e.outvars[0].aval.dtype == jnp.float32 for e in dots)
