"""Greedy and beam search over any autoregressive decoder, jit-compatible.

A decoder is given as `step_fn(tokens_N, state) -> (logits_NxV, state)`: it reads one token
per row (the previous one; `bos_id` first) and returns the next token's logits and its new
state (a key/value cache, a recurrent carry, encoder outputs: any pytree). Both searches run
in a `lax.while_loop` that stops when every row has ended, so a step costs one call of the
decoder on one token per row.

Outputs hold the generated tokens without `<bos>`: a sequence ends with `eos_id` and is
`pad_id` after it, or fills all `max_len` positions. The searches do not forbid any token
(a trained model does not emit `<pad>` or `<bos>`).

Beam search keeps, per row, the K best unfinished hypotheses and the K best finished ones
(ended by `<eos>`, or cut at `max_len`), as the Flax WMT example and T5X do. Each step ranks
the 2K best one-token extensions of the unfinished ones (at most K of them end in `<eos>`, so
K others always remain): the K best that do not end become the next unfinished set, and those
that end and rank among the K best join the finished set with score
log p / ((5 + length) / 6) ** length_penalty (GNMT; length counts `<eos>`). Admitting only the
K best, as fairseq and Hugging Face do (Flax and T5X admit all 2K), makes a beam of one with
`length_penalty=0` exactly greedy search. A row is done when its worst finished score beats
the best score any unfinished hypothesis could still reach: its log-probability, which only
falls, over the largest penalty, that of `max_len` (T5X's bound). Only beam 0 is live at the
first step, the others start at `NEG_INF`: should a row have fewer than K distinct hypotheses,
its last results descend from those and score near `NEG_INF`.

The state of beam search is tiled to B * K rows (row b * K + k is beam k of sentence b) along
axis 0 of every leaf with at least one dimension, and reordered by gathering along that axis
as beams are chosen; scalar leaves (a cache index) are shared by all rows and left as they are.

Dimension letters: B batch, K beam, L max_len, V vocabulary, N rows of the decoder (B or B*K).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]
NEG_INF = -1.0e9  # a finite "minus infinity": sums and comparisons stay well defined


def greedy_search(step_fn: StepFn, state, *, batch_size: int, max_len: int, bos_id: int,
                  eos_id: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """The most likely token at every step: (tokens [B, L] int32, scores [B], the sum of the
    chosen tokens' log-probabilities up to and with `<eos>`)."""
    B = batch_size

    def body(carry):
        t, prev_B, done_B, tokens_BxL, scores_B, state = carry
        logits_BxV, state = step_fn(prev_B, state)
        logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
        token_B = jnp.where(done_B, pad_id, jnp.argmax(logp_BxV, -1).astype(jnp.int32))
        chosen_B = jnp.take_along_axis(logp_BxV, token_B[:, None], -1)[:, 0]
        scores_B = scores_B + jnp.where(done_B, 0.0, chosen_B)
        tokens_BxL = lax.dynamic_update_slice(tokens_BxL, token_B[:, None], (0, t))
        return t + 1, token_B, done_B | (token_B == eos_id), tokens_BxL, scores_B, state

    def cond(carry):
        t, _, done_B, *_ = carry
        return (t < max_len) & ~jnp.all(done_B)

    init = (jnp.int32(0), jnp.full((B,), bos_id, jnp.int32), jnp.zeros((B,), bool),
            jnp.full((B, max_len), pad_id, jnp.int32), jnp.zeros((B,), jnp.float32), state)
    _, _, _, tokens_BxL, scores_B, _ = lax.while_loop(cond, body, init)
    return tokens_BxL, scores_B


def length_penalty_factor(length, alpha):
    """GNMT's ((5 + length) / 6) ** alpha (Wu et al. 2016); 1 when alpha is 0."""
    return ((5.0 + length) / 6.0) ** alpha


def _gather_rows(tree, rows_N):
    return jax.tree.map(lambda x: x[rows_N] if jnp.ndim(x) >= 1 else x, tree)


def beam_search(step_fn: StepFn, state, *, batch_size: int, beam_size: int, max_len: int,
                bos_id: int, eos_id: int, pad_id: int,
                length_penalty=0.6) -> tuple[jax.Array, jax.Array]:
    """(tokens [B, K, L] int32, scores [B, K]) of the K best finished hypotheses of each row,
    best first; scores are length-penalised log-probabilities (see the module docstring)."""
    B, K, L = batch_size, beam_size, max_len
    state = jax.tree.map(lambda x: jnp.repeat(x, K, axis=0) if jnp.ndim(x) >= 1 else x, state)
    alive_logp_BxK = jnp.full((B, K), NEG_INF, jnp.float32).at[:, 0].set(0.0)
    max_factor = length_penalty_factor(jnp.float32(L), length_penalty)

    def body(carry):
        t, alive_BxKxL, alive_logp_BxK, fin_BxKxL, fin_score_BxK, state = carry
        prev_N = jnp.where(t == 0, bos_id, alive_BxKxL[:, :, jnp.maximum(t - 1, 0)]).reshape(-1)
        logits_NxV, state = step_fn(prev_N, state)
        V = logits_NxV.shape[-1]
        logp_BxKxV = jax.nn.log_softmax(logits_NxV.astype(jnp.float32), -1).reshape(B, K, V)
        cand_logp_BxKV = (alive_logp_BxK[:, :, None] + logp_BxKxV).reshape(B, K * V)
        top_logp_Bx2K, top_idx_Bx2K = lax.top_k(cand_logp_BxKV, 2 * K)
        parent_Bx2K, token_Bx2K = top_idx_Bx2K // V, (top_idx_Bx2K % V).astype(jnp.int32)
        seqs_Bx2KxL = jnp.take_along_axis(alive_BxKxL, parent_Bx2K[:, :, None], 1)
        seqs_Bx2KxL = lax.dynamic_update_slice(seqs_Bx2KxL, token_Bx2K[:, :, None], (0, 0, t))
        ends_Bx2K = (token_Bx2K == eos_id) | (t == L - 1)
        new_score_Bx2K = jnp.where(
            ends_Bx2K & (jnp.arange(2 * K) < K),
            top_logp_Bx2K / length_penalty_factor(t + 1.0, length_penalty), NEG_INF)
        fin_score_Bx3K = jnp.concatenate([fin_score_BxK, new_score_Bx2K], 1)
        fin_score_BxK, keep_BxK = lax.top_k(fin_score_Bx3K, K)
        fin_BxKxL = jnp.take_along_axis(jnp.concatenate([fin_BxKxL, seqs_Bx2KxL], 1),
                                        keep_BxK[:, :, None], 1)
        alive_logp_BxK, pick_BxK = lax.top_k(jnp.where(ends_Bx2K, NEG_INF, top_logp_Bx2K), K)
        alive_BxKxL = jnp.take_along_axis(seqs_Bx2KxL, pick_BxK[:, :, None], 1)
        parent_BxK = jnp.take_along_axis(parent_Bx2K, pick_BxK, 1)
        state = _gather_rows(state, (jnp.arange(B)[:, None] * K + parent_BxK).reshape(-1))
        return t + 1, alive_BxKxL, alive_logp_BxK, fin_BxKxL, fin_score_BxK, state

    def cond(carry):
        t, _, alive_logp_BxK, _, fin_score_BxK, _ = carry
        best_reachable_B = alive_logp_BxK[:, 0] / max_factor
        return (t < L) & ~jnp.all(fin_score_BxK[:, -1] > best_reachable_B)

    init = (jnp.int32(0), jnp.full((B, K, L), pad_id, jnp.int32), alive_logp_BxK,
            jnp.full((B, K, L), pad_id, jnp.int32), jnp.full((B, K), NEG_INF, jnp.float32),
            state)
    _, _, _, fin_BxKxL, fin_score_BxK, _ = lax.while_loop(cond, body, init)
    return fin_BxKxL, fin_score_BxK


def sample(step_fn: StepFn, logits_1xV, state, rng, temperature, length: int):
    """Draws `length` tokens from softmax(logits / temperature), feeding each back in with
    `step_fn(token_1, state) -> (logits_1x1xV, state)`; temperature 0 takes the most likely."""
    def step(carry, key):
        logits_1xV, state = carry
        scaled = logits_1xV / jnp.maximum(temperature, 1e-6)
        token_1 = jnp.where(temperature > 0, jax.random.categorical(key, scaled),
                            jnp.argmax(logits_1xV, axis=-1))
        logits_1x1xV, state = step_fn(token_1, state)
        return (logits_1x1xV[:, -1], state), token_1[0]

    _, tokens = lax.scan(step, (logits_1xV, state), jax.random.split(rng, length))
    return tokens
