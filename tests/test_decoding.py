"""Greedy and beam search against exhaustive search and a NumPy re-run of a tiny fixed
recurrent decoder, plus a hand-made table where greedy search is short-sighted."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import decoding

V, H, L = 5, 6, 4
UNK, PAD, BOS, EOS = 0, 1, 2, 3  # the project's ids; the searches may emit any of the V tokens
IDS = dict(max_len=L, bos_id=BOS, eos_id=EOS, pad_id=PAD)


def _weights(seed):
    rng = np.random.default_rng(seed)
    return {"embed": rng.normal(0, 1.5, (V, H)), "U": rng.normal(0, 0.8, (H, H)),
            "out": rng.normal(0, 1.5, (H, V)), "bias": rng.normal(0, 1.0, (L, V))}


def _step(w):
    """state = (hidden [N, H], position: a scalar shared by all rows, which beam search must
    neither tile nor gather); logits of the next token from tanh(embed[token] + hidden U)."""
    embed, U, out, bias = (jnp.asarray(w[k], jnp.float32) for k in ("embed", "U", "out", "bias"))

    def step(tokens_N, state):
        h_NxH, position = state
        assert jnp.ndim(position) == 0, "a scalar state leaf was tiled or gathered"
        h_NxH = jnp.tanh(embed[tokens_N] + h_NxH @ U)
        return h_NxH @ out + bias[position], (h_NxH, position + 1)
    return step


def _naive_log_prob(w, h0, tokens):
    """Sum of log-probabilities of `tokens` (up to and with EOS), in NumPy."""
    h, prev, total = np.asarray(h0, np.float64), BOS, 0.0
    for position, token in enumerate(tokens):
        h = np.tanh(w["embed"][prev] + h @ w["U"])
        logits = h @ w["out"] + w["bias"][position]
        total += logits[token] - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        prev = token
        if token == EOS:
            break
    return total


def _all_hypotheses():
    """Every sequence the searches can return: ended by EOS at some length, or L tokens."""
    others = [t for t in range(V) if t != EOS]
    for n in range(1, L + 1):
        for body in itertools.product(others, repeat=n - 1):
            yield list(body) + [EOS]
    for body in itertools.product(others, repeat=L):
        yield list(body)


def _padded(tokens):
    return tokens + [PAD] * (L - len(tokens))


def _exhaustive(w, h0, alpha):
    """(score, tokens) of all hypotheses, best first."""
    scored = [(_naive_log_prob(w, h0, s) / decoding.length_penalty_factor(len(s), alpha), s)
              for s in _all_hypotheses()]
    return sorted(scored, key=lambda pair: -pair[0])


def _assert_pad_after_eos(tokens_xL):
    for row in np.asarray(tokens_xL).reshape(-1, L).tolist():
        if EOS in row:
            assert row[row.index(EOS) + 1:] == [PAD] * (L - 1 - row.index(EOS)), row


def _h0(batch, seed=5):
    return np.random.default_rng(seed).normal(0, 1, (batch, H)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _searches(seed):
    """Jitted greedy(h0) and beam(h0, alpha, K) over the decoder of `seed`."""
    step = _step(_weights(seed))
    greedy = jax.jit(lambda h0: decoding.greedy_search(
        step, (h0, jnp.int32(0)), batch_size=h0.shape[0], **IDS))
    beam = jax.jit(lambda h0, alpha, k: decoding.beam_search(
        step, (h0, jnp.int32(0)), batch_size=h0.shape[0], beam_size=k, length_penalty=alpha,
        **IDS), static_argnums=2)
    return greedy, beam


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_wide_beam_equals_exhaustive_search(alpha):
    """With K = V^(L-1) every extension of every unfinished prefix ranks among the K best of
    its step, so beam search is exact: its K results are the K best of all hypotheses, in
    order, with their scores."""
    w, h0 = _weights(0), _h0(3)
    K = V ** (L - 1)
    tokens, scores = _searches(0)[1](h0, jnp.float32(alpha), K)
    _assert_pad_after_eos(tokens)
    for b in range(3):
        best = _exhaustive(w, h0[b], alpha)[:K]
        np.testing.assert_allclose(scores[b], [s for s, _ in best], rtol=1e-5, atol=1e-5)
        assert np.asarray(tokens[b]).tolist() == [_padded(s) for _, s in best]


def test_greedy_is_the_argmax_path_and_pads_after_eos():
    w, h0 = _weights(1), _h0(4)
    tokens, scores = _searches(1)[0](h0)
    _assert_pad_after_eos(tokens)
    for b in range(4):
        row = np.asarray(tokens[b]).tolist()
        n = row.index(EOS) + 1 if EOS in row else L
        h, prev = np.asarray(h0[b], np.float64), BOS
        for t in range(n):
            h = np.tanh(w["embed"][prev] + h @ w["U"])
            assert row[t] == int(np.argmax(h @ w["out"] + w["bias"][t]))
            prev = row[t]
        assert scores[b] == pytest.approx(_naive_log_prob(w, h0[b], row[:n]), abs=1e-5)


def test_beam_of_one_is_greedy():
    """Exactly greedy without a length penalty; with one, greedy's hypothesis or one that
    scores better under the penalty."""
    h0 = _h0(8)
    for seed in range(4):
        greedy, beam = _searches(seed)
        g_tokens, g_scores = greedy(h0)
        b_tokens, b_scores = beam(h0, jnp.float32(0.0), 1)
        np.testing.assert_array_equal(b_tokens[:, 0], g_tokens)
        np.testing.assert_allclose(b_scores[:, 0], g_scores, rtol=1e-6)
        g_length = np.where((g_tokens == EOS).any(1), np.argmax(g_tokens == EOS, 1) + 1, L)
        _, b_scores = beam(h0, jnp.float32(0.6), 1)
        g_penalised = g_scores / decoding.length_penalty_factor(g_length, 0.6)
        assert np.all(np.asarray(b_scores[:, 0]) >= g_penalised - 1e-5)


def _table_step(next_prob_VxV):
    """A bigram decoder: logits of the next token depend on the previous token only."""
    logits_VxV = jnp.log(jnp.asarray(next_prob_VxV, jnp.float32))
    return lambda tokens_N, state: (logits_VxV[tokens_N], state)


def test_beam_search_finds_what_greedy_misses():
    """After BOS, token 4 (p .5) beats token 0 (p .4), but 4 is followed by a flat
    distribution and 0 by EOS with p .96: greedy ends 4 EOS (log .5 + log .24), a beam of 3
    finds 0 EOS (log .4 + log .96)."""
    next_prob_VxV = np.full((V, V), 1.0 / V)
    next_prob_VxV[BOS] = [0.4, 0.05, 0.03, 0.02, 0.5]
    next_prob_VxV[4] = [0.19, 0.19, 0.19, 0.24, 0.19]
    next_prob_VxV[0] = [0.01, 0.01, 0.01, 0.96, 0.01]
    step, state_B = _table_step(next_prob_VxV), jnp.zeros((2,))
    g_tokens, g_scores = jax.jit(lambda s: decoding.greedy_search(
        step, s, batch_size=2, **IDS))(state_B)
    b_tokens, b_scores = jax.jit(lambda s: decoding.beam_search(
        step, s, batch_size=2, beam_size=3, length_penalty=0.0, **IDS))(state_B)
    assert np.asarray(g_tokens).tolist() == [[4, EOS, PAD, PAD]] * 2
    assert np.asarray(b_tokens[:, 0]).tolist() == [[0, EOS, PAD, PAD]] * 2
    np.testing.assert_allclose(g_scores, np.log(0.5 * 0.24), rtol=1e-5)
    np.testing.assert_allclose(b_scores[:, 0], np.log(0.4 * 0.96), rtol=1e-5)


def test_beam_search_never_scores_below_greedy():
    better = 0
    for seed in range(4):
        h0 = _h0(8, seed)
        _, g_scores = _searches(seed)[0](h0)
        b_tokens, b_scores = _searches(seed)[1](h0, jnp.float32(0.0), 3)
        _assert_pad_after_eos(b_tokens)
        assert np.all(np.asarray(b_scores[:, 0]) >= np.asarray(g_scores) - 1e-5)
        assert np.all(np.diff(np.asarray(b_scores), axis=1) <= 0), "beams not best first"
        better += int(np.sum(np.asarray(b_scores[:, 0]) > np.asarray(g_scores) + 1e-4))
    assert better > 0


def test_rows_are_independent():
    """Each row of a batch (its own initial state, its own early stop) gives what it gives
    alone."""
    h0 = _h0(5)
    greedy, beam = _searches(2)
    g_tokens, g_scores = greedy(h0)
    b_tokens, b_scores = beam(h0, jnp.float32(0.6), 3)
    for b in (0, 4):
        one_tokens, one_scores = greedy(h0[b:b + 1])
        np.testing.assert_array_equal(one_tokens[0], g_tokens[b])
        np.testing.assert_allclose(one_scores[0], g_scores[b], rtol=1e-6)
        one_tokens, one_scores = beam(h0[b:b + 1], jnp.float32(0.6), 3)
        np.testing.assert_array_equal(one_tokens[0], b_tokens[b])
        np.testing.assert_allclose(one_scores[0], b_scores[b], rtol=1e-6)
