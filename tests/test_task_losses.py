"""Each task's loss as a pure function of (model, params, hand-made batch, carry): no corpus, no
tokenizer, no engine. The sums it returns are checked against NumPy over the model's own logits
(cross-entropy, weights, chosen positions, accuracy), and the carry it hands on."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn.bert import BertClassifier, BertEncoder, BertPretraining
from seqjax.nn.lm import RecurrentLM
from seqjax.nn.transformer import (
    EncoderDecoder,
    TransformerDecoder,
    TransformerEncoder,
    TransformerLM,
)
from seqjax.tasks import bert, bert_finetune, charlm, charlm_transformer, translation

V = 11


def _ce(logits, targets):
    """Cross-entropy per position, in float64 NumPy."""
    logits = np.asarray(logits, np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(log_p, np.asarray(targets)[..., None], -1)[..., 0]


def _tokens(key, shape, low=0):
    return jax.random.randint(jax.random.PRNGKey(key), shape, low, V)


@pytest.mark.parametrize("reset", [True, False])
def test_recurrent_lm_loss_resets_or_carries_the_state(reset):
    model = RecurrentLM(vocab_size=V, cell="gru", hidden=6)
    inputs, targets = _tokens(0, (3, 5)), _tokens(1, (3, 5))
    params = model.init(jax.random.PRNGKey(2), inputs, model.initialize_carry(3))
    carry = jax.tree.map(lambda c: jax.random.normal(jax.random.PRNGKey(3), c.shape),
                         model.initialize_carry(3))
    batch = {"inputs": inputs, "targets": targets, "reset": jnp.asarray(reset)}
    sums, new_carry = charlm.loss(model, params, batch, carry)

    start = model.initialize_carry(3) if reset else carry
    logits, expected_carry = model.apply(params, inputs, start)
    np.testing.assert_allclose(sums["loss"], _ce(logits, targets).sum(), rtol=1e-5)
    assert float(sums["weight"]) == 15
    for a, b in zip(jax.tree.leaves(new_carry), jax.tree.leaves(expected_carry)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # Eval batches weigh the padding of the held-out stream's last rows by 0.
    weights = jnp.ones((3, 5)).at[2, 3:].set(0.0)
    weighted, _ = charlm.loss(model, params, dict(batch, weights=weights), carry)
    np.testing.assert_allclose(weighted["loss"], (_ce(logits, targets) * weights).sum(), rtol=1e-5)
    assert float(weighted["weight"]) == 13
    # No gradient flows back into an earlier batch through the carry (truncated BPTT).
    grad = jax.grad(lambda c: sum(x.sum() for x in jax.tree.leaves(
        charlm.loss(model, params, batch, c)[1])))(carry)
    assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(grad))


def test_transformer_lm_loss_with_dropout_only_in_training():
    model = TransformerLM(V, num_layers=1, d_model=8, num_heads=2, ffn_hiddens=16, max_length=6,
                          dropout_rate=0.5)
    inputs, targets = _tokens(4, (2, 6)), _tokens(5, (2, 6))
    params = model.init(jax.random.PRNGKey(6), inputs)
    weights = jnp.ones((2, 6)).at[1, 4:].set(0.0)
    batch = {"inputs": inputs, "targets": targets, "weights": weights}
    sums, carry = charlm_transformer.loss(model, params, batch)
    ce = _ce(model.apply(params, inputs), targets)
    np.testing.assert_allclose(sums["loss"], (ce * weights).sum(), rtol=1e-5)
    assert float(sums["weight"]) == 10 and carry == ()
    rng = jax.random.PRNGKey(7)
    trained, _ = charlm_transformer.loss(model, params, batch, rng=rng, train=True)
    dropped = model.apply(params, inputs, deterministic=False, rngs={"dropout": rng})
    np.testing.assert_allclose(trained["loss"], (_ce(dropped, targets) * weights).sum(), rtol=1e-5)
    assert abs(float(trained["loss"]) - float(sums["loss"])) > 1e-3


@pytest.mark.parametrize("name", translation.MODELS)
def test_translation_loss_counts_the_valid_target_tokens(name):
    if name == "transformer":
        hp = dict(num_layers=1, d_model=8, num_heads=2, ffn_hiddens=16, max_length=5)
        model = EncoderDecoder(TransformerEncoder(V, **hp), TransformerDecoder(V, **hp))
    else:
        from seqjax.nn.seq2seq import Seq2SeqAttentionDecoder, Seq2SeqEncoder
        hp = dict(embed_size=6, num_hiddens=8, num_layers=1)
        model = EncoderDecoder(Seq2SeqEncoder(V, **hp), Seq2SeqAttentionDecoder(V, **hp))
    src, tgt_in, tgt_out = _tokens(8, (3, 5)), _tokens(9, (3, 5)), _tokens(10, (3, 5))
    src_len = jnp.array([5, 2, 3])
    weights = (jnp.arange(5)[None] < jnp.array([[4], [5], [1]])).astype(jnp.float32)
    params = model.init(jax.random.PRNGKey(11), src, src_len, tgt_in)
    batch = dict(src=src, src_valid_len=src_len, tgt_in=tgt_in, tgt_out=tgt_out, weights=weights)
    sums, _ = translation.loss(model, params, batch)
    logits = np.asarray(model.apply(params, src, src_len, tgt_in))
    w = np.asarray(weights)
    np.testing.assert_allclose(sums["loss"], (_ce(logits, tgt_out) * w).sum(), rtol=1e-5)
    assert float(sums["weight"]) == w.sum() == 10
    assert float(sums["accuracy"]) == ((logits.argmax(-1) == np.asarray(tgt_out)) * w).sum()


def _encoder():
    return BertEncoder(V, num_layers=1, d_model=8, num_heads=2, ffn_hiddens=16, max_length=6,
                       dropout_rate=0.0, attention_dropout_rate=0.0)


def _bert_inputs():
    tokens = _tokens(12, (3, 6), low=5)
    valid_len = jnp.array([6, 4, 6])
    segments = (jnp.arange(6)[None] >= 3).astype(jnp.int32).repeat(3, 0)
    return dict(tokens=tokens, segments=segments, valid_len=valid_len)


@pytest.mark.parametrize("nsp", [True, False])
def test_pretraining_loss_on_chosen_positions(nsp):
    model = BertPretraining(_encoder(), nsp=nsp)
    batch = _bert_inputs()
    mask_BxL = jnp.arange(6)[None] < batch["valid_len"][:, None]
    chosen = np.zeros((3, 6), np.float32)  # at most P = 2 chosen per row, none in padding
    chosen[0, [1, 4]] = chosen[1, 2] = chosen[2, [0, 5]] = 1
    targets = _tokens(13, (3, 6))
    inputs = jnp.where(chosen > 0, 4, batch["tokens"])  # [MASK] is id 4
    batch.update(inputs=inputs, targets=targets, weights=jnp.asarray(chosen),
                 nsp_label=jnp.array([1, 0, 1]), row_weight=jnp.array([1.0, 1.0, 0.0]))
    params = model.init(jax.random.PRNGKey(14), inputs, batch["segments"], mask_BxL,
                        jnp.zeros((3, 2), jnp.int32))
    loss = functools.partial(bert.pretraining_loss, model, draw_mask=None, max_predictions=2)
    sums, _ = loss(params, batch)

    # Reference: the logits at every position, the chosen ones of the rows that count.
    mlm_logits, nsp_logits = model.apply(params, inputs, batch["segments"], mask_BxL)
    w = chosen * np.asarray(batch["row_weight"])[:, None]
    mlm_sum = (_ce(mlm_logits, targets) * w).sum()
    correct = (np.asarray(mlm_logits).argmax(-1) == np.asarray(targets)) * w
    np.testing.assert_allclose(sums["mlm_loss"], mlm_sum, rtol=1e-5)
    assert float(sums["weight"]) == w.sum() == 3
    assert float(sums["mlm_accuracy"]) == correct.sum()
    if nsp:
        _, nsp_logits = model.apply(params, inputs, batch["segments"], mask_BxL,
                                    jnp.zeros((3, 1), jnp.int32))
        nsp_ce = _ce(nsp_logits, batch["nsp_label"])[:2].sum()
        np.testing.assert_allclose(sums["nsp_loss"], nsp_ce, rtol=1e-5)
        assert float(sums["sequences"]) == 2
        # loss / weight = mean MLM loss per chosen token + mean NSP loss per sequence.
        np.testing.assert_allclose(sums["loss"] / sums["weight"], mlm_sum / 3 + nsp_ce / 2,
                                   rtol=1e-5)
    else:
        assert nsp_logits is None and set(sums) == {"loss", "weight", "mlm_accuracy", "mlm_loss"}

    # Training draws the mask itself, from the rng it is given.
    def draw_mask(rng, tokens):
        assert tokens is batch["tokens"]
        return inputs, targets, jnp.asarray(chosen)

    trained, _ = bert.pretraining_loss(model, params, batch, rng=jax.random.PRNGKey(0),
                                       train=True, draw_mask=draw_mask, max_predictions=2)
    # Every row counts in training (row_weight marks padding rows of evaluation batches only).
    np.testing.assert_allclose(trained["mlm_loss"], (_ce(mlm_logits, targets) * chosen).sum(),
                               rtol=1e-5)


def test_classification_loss_weighs_rows():
    model = BertClassifier(_encoder(), num_classes=3, dropout_rate=0.0)
    batch = dict(_bert_inputs(), labels=jnp.array([2, 0, 1]), row_weight=jnp.array([1.0, 0.0, 1.0]))
    mask_BxL = jnp.arange(6)[None] < batch["valid_len"][:, None]
    params = model.init(jax.random.PRNGKey(15), batch["tokens"], batch["segments"], mask_BxL)
    sums, _ = bert_finetune.classification_loss(model, params, batch)
    logits = np.asarray(model.apply(params, batch["tokens"], batch["segments"], mask_BxL))
    w = np.asarray(batch["row_weight"])
    np.testing.assert_allclose(sums["loss"], (_ce(logits, batch["labels"]) * w).sum(), rtol=1e-5)
    assert float(sums["weight"]) == 2
    assert float(sums["accuracy"]) == ((logits.argmax(-1) == np.asarray(batch["labels"])) * w).sum()
