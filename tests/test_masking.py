"""`mask_tokens`: the statistics of BERT's masking over many draws, special tokens and padding,
the caps, whole-word masking, and bad arguments."""

import jax
import numpy as np
import pytest

from seqjax.data.masking import mask_tokens

V, MASK, SPECIAL = 1000, 4, (0, 1, 2, 3)  # [PAD] [UNK] [CLS] [SEP]; [MASK] is special too


def _rows(rng, B, L):
    """[CLS] ordinary tokens [SEP] then padding, at random lengths, with a few [UNK]s."""
    tokens = rng.integers(5, V, (B, L))
    lengths = rng.integers(3, L + 1, B)
    tokens[rng.random((B, L)) < 0.02] = 1
    tokens[:, 0] = 2
    tokens[np.arange(B), lengths - 1] = 3
    tokens[np.arange(L)[None, :] >= lengths[:, None]] = 0
    return tokens.astype(np.int32)


@pytest.fixture(scope="module")
def draws():
    tokens = _rows(np.random.default_rng(0), 256, 64)
    fn = jax.jit(jax.vmap(lambda key: mask_tokens(key, tokens, vocab_size=V, mask_id=MASK,
                                                  special_ids=SPECIAL)))
    inputs, targets, weights = map(np.asarray, fn(jax.random.split(jax.random.PRNGKey(0), 40)))
    return tokens, inputs, targets, weights


def test_each_row_chooses_15_percent_of_its_ordinary_tokens(draws):
    tokens, _, _, weights = draws
    candidates = ~np.isin(tokens, (*SPECIAL, MASK))
    n = candidates.sum(-1)
    expected = np.maximum(np.round(0.15 * n), np.minimum(n, 1))
    assert (weights.sum(-1) == expected[None]).all()
    # Over all rows and draws: 15% up to the rounding of each row's count.
    fraction = weights.sum() / (len(weights) * n.sum())
    assert abs(fraction - 0.15) <= 0.5 * len(n) / n.sum()


def test_positions_are_chosen_uniformly(draws):
    """Over 40 draws of the full-length rows, every ordinary position is chosen about k/n of the
    time (binomial tolerance of 5 standard deviations)."""
    tokens, _, _, weights = draws
    candidates = ~np.isin(tokens, (*SPECIAL, MASK))
    p = weights.sum(-1)[0] / candidates.sum(-1)  # per row
    frequency = weights.mean(0)[candidates]
    expected = np.broadcast_to(p[:, None], tokens.shape)[candidates]
    sd = np.sqrt(expected * (1 - expected) / len(weights))
    assert (np.abs(frequency - expected) <= 5 * sd + 1e-9).all()


def test_80_10_10_split_of_the_chosen_tokens(draws):
    tokens, inputs, targets, weights = draws
    chosen = weights > 0
    originals, corrupted = np.broadcast_to(tokens, inputs.shape)[chosen], inputs[chosen]
    n, ordinary = chosen.sum(), V - 5
    shares = {"mask": np.mean(corrupted == MASK),
              "random": np.mean((corrupted != MASK) & (corrupted != originals)),
              "kept": np.mean(corrupted == originals)}
    # A random replacement equals the original with probability 1/ordinary.
    expected = {"mask": 0.8, "random": 0.1 * (1 - 1 / ordinary), "kept": 0.1 * (1 + 1 / ordinary)}
    for name, share in shares.items():
        sd = np.sqrt(expected[name] * (1 - expected[name]) / n)
        assert abs(share - expected[name]) <= 5 * sd, (name, share)
    assert not np.isin(corrupted, SPECIAL).any()  # random tokens are never special


def test_special_tokens_and_padding_are_never_chosen_or_changed(draws):
    tokens, inputs, targets, weights = draws
    special = np.broadcast_to(np.isin(tokens, (*SPECIAL, MASK)), weights.shape)
    assert (weights[special] == 0).all()
    unchosen = weights == 0
    assert (inputs[unchosen] == np.broadcast_to(tokens, inputs.shape)[unchosen]).all()
    assert (targets[unchosen] == 0).all()
    chosen = ~unchosen
    assert (targets[chosen] == np.broadcast_to(tokens, targets.shape)[chosen]).all()
    assert (targets[chosen] != 0).all()
    assert set(np.unique(weights)) == {0.0, 1.0}


def test_max_predictions_caps_each_row_and_draws_differ_by_key():
    tokens = _rows(np.random.default_rng(1), 32, 128)
    kw = dict(vocab_size=V, mask_id=MASK, special_ids=SPECIAL, max_predictions=5)
    _, _, w1 = mask_tokens(jax.random.PRNGKey(1), tokens, **kw)
    _, _, w2 = mask_tokens(jax.random.PRNGKey(2), tokens, **kw)
    assert (np.asarray(w1).sum(-1) <= 5).all() and np.asarray(w1).sum(-1).max() == 5
    assert (np.asarray(w1) != np.asarray(w2)).any()


def test_whole_word_masking_never_splits_a_word():
    rng = np.random.default_rng(2)
    tokens = _rows(rng, 128, 48)
    starts = rng.random(tokens.shape) < 0.6  # words of one to several pieces
    starts[:, 1] = True
    inputs, targets, weights = map(np.asarray, mask_tokens(
        jax.random.PRNGKey(3), tokens, vocab_size=V, mask_id=MASK, special_ids=SPECIAL,
        word_starts=starts))
    candidates = ~np.isin(tokens, (*SPECIAL, MASK))
    budget = np.maximum(np.round(0.15 * candidates.sum(-1)), 1)
    assert (weights.sum(-1) <= budget).all() and weights.sum() > 0.5 * budget.sum()
    for b in range(len(tokens)):
        word = np.cumsum(starts[b] | ~candidates[b]) - 1
        for w in np.unique(word[weights[b] > 0]):
            assert (weights[b][word == w] == 1).all(), (b, w)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask_prob=0.0), "mask_prob"),
    (dict(mask_prob=1.5), "mask_prob"),
    (dict(mask_token_prob=0.95, random_token_prob=0.1), "> 1"),
    (dict(max_predictions=0), "max_predictions"),
    (dict(special_ids=(0, V)), "special ids"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    args = {**dict(vocab_size=V, mask_id=MASK, special_ids=SPECIAL), **kwargs}
    with pytest.raises(ValueError, match=message):
        mask_tokens(jax.random.PRNGKey(0), np.ones((2, 8), np.int32) * 7, **args)
