"""Greedy and beam search against exhaustive search with a tiny fixed recurrent decoder."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import decoding

V, H, L = 4, 6, 4
BOS, EOS, PAD = 0, 3, 1  # the decoder reads BOS first; it may emit any of the V tokens


def _weights(seed):
    rng = np.random.default_rng(seed)
    return {"embed": rng.normal(0, 1.5, (V, H)), "U": rng.normal(0, 0.8, (H, H)),
            "out": rng.normal(0, 1.5, (H, V))}


def _step(w):
    """state = (hidden [N, H], a scalar that must pass through untouched); logits of the next
    token from tanh(embed[token] + hidden U)."""
    def step(tokens_N, state):
        h_NxH, marker = state
        h_NxH = jnp.tanh(jnp.asarray(w["embed"], jnp.float32)[tokens_N]
                         + h_NxH @ jnp.asarray(w["U"], jnp.float32))
        return h_NxH @ jnp.asarray(w["out"], jnp.float32) + 0 * marker, (h_NxH, marker)
    return step


def _naive_log_prob(w, h0, tokens):
    """Sum of log-probabilities of `tokens` (up to and with EOS), in NumPy."""
    h, prev, total = np.asarray(h0, np.float64), BOS, 0.0
    for token in tokens:
        h = np.tanh(w["embed"][prev] + h @ w["U"])
        logits = h @ w["out"]
        total += logits[token] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
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
    scored = [(_naive_log_prob(w, h0, s) / decoding.length_penalty_factor(len(s), alpha), s)
              for s in _all_hypotheses()]
    return sorted(scored, key=lambda pair: -pair[0])


def _h0(batch, seed=5):
    return np.random.default_rng(seed).normal(0, 1, (batch, H)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _searches(seed):
    step = _step(_weights(seed))
    ids = dict(max_len=L, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    greedy = jax.jit(lambda h0: decoding.greedy_search(
        step, (h0, jnp.float32(0)), batch_size=h0.shape[0], **ids))
    beam = jax.jit(lambda h0, alpha, k: decoding.beam_search(
        step, (h0, jnp.float32(0)), batch_size=h0.shape[0], beam_size=k, length_penalty=alpha,
        **ids), static_argnums=2)
    return greedy, beam


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_wide_beam_equals_exhaustive_search(alpha):
    """With more beams than unfinished prefixes ((V-1)^(L-1) = 27), beam search is exact: its
    K results are the K best of all hypotheses, in order, with their scores."""
    w, h0 = _weights(0), _h0(3)
    K = 27
    tokens, scores = _searches(0)[1](h0, jnp.float32(alpha), K)
    for b in range(3):
        best = _exhaustive(w, h0[b], alpha)[:K]
        np.testing.assert_allclose(np.asarray(scores[b]), [s for s, _ in best], rtol=1e-5, atol=1e-5)
        assert np.asarray(tokens[b]).tolist() == [_padded(s) for _, s in best]


def test_beam_of_one_is_greedy():
    h0 = _h0(4)
    for seed in range(3):
        greedy, beam = _searches(seed)
        g_tokens, g_scores = greedy(h0)
        b_tokens, b_scores = beam(h0, jnp.float32(0.0), 1)
        np.testing.assert_array_equal(b_tokens[:, 0], g_tokens)
        np.testing.assert_allclose(b_scores[:, 0], g_scores, rtol=1e-6)


def test_greedy_is_the_argmax_path_and_pads_after_eos():
    w, h0 = _weights(1), _h0(4)
    tokens, scores = _searches(1)[0](h0)
    for b in range(4):
        row = np.asarray(tokens[b]).tolist()
        n = row.index(EOS) + 1 if EOS in row else L
        assert row[n:] == [PAD] * (L - n)
        h, prev = np.asarray(h0[b], np.float64), BOS
        for t in range(n):
            h = np.tanh(w["embed"][prev] + h @ w["U"])
            assert row[t] == int(np.argmax(h @ w["out"]))
            prev = row[t]
        assert scores[b] == pytest.approx(_naive_log_prob(w, h0[b], row[:n]), abs=1e-5)


def test_beam_search_beats_greedy_where_greedy_is_short_sighted():
    """Seeds where greedy's sequence is not the most likely: a beam of 3 finds a strictly
    better one, and never a worse one."""
    better = 0
    for seed in range(12):
        w, h0 = _weights(seed), _h0(4, seed)
        g_tokens, g_scores = _searches(seed)[0](h0)
        _, b_scores = _searches(seed)[1](h0, jnp.float32(0.0), 3)
        assert np.all(np.asarray(b_scores[:, 0]) >= np.asarray(g_scores) - 1e-5)
        better += int(np.sum(np.asarray(b_scores[:, 0]) > np.asarray(g_scores) + 1e-4))
    assert better > 0


def test_rows_are_independent():
    h0 = _h0(5)
    _, beam = _searches(2)
    tokens, scores = beam(h0, jnp.float32(0.6), 3)
    for b in (0, 4):
        one_tokens, one_scores = beam(h0[b:b + 1], jnp.float32(0.6), 3)
        np.testing.assert_array_equal(one_tokens[0], tokens[b])
        np.testing.assert_allclose(one_scores[0], scores[b], rtol=1e-6)
