"""BERT's masked-language-model corruption (Devlin et al. 2019; the textbook's pretraining
chapter), as a pure JAX function of a key, so that a train step draws a fresh mask for every
batch (dynamic masking, as RoBERTa) inside the compiled step.

Dimension letters: B batch (any leading axes), L length, M packed sequences a row.
"""

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _fraction(name: str, value, *, open_low: bool = False):
    ok = isinstance(value, numbers.Real) and (0 < value if open_low else 0 <= value) and value <= 1
    if not ok:
        raise ValueError(f"{name}={value!r}: must be in {'(' if open_low else '['}0, 1]")


def mask_tokens(rng, tokens, *, vocab_size: int, mask_id: int, special_ids, mask_prob=0.15,
                mask_token_prob=0.8, random_token_prob=0.1, max_predictions=None,
                word_starts=None, pack_ids=None, max_sequences=None):
    """Chooses positions of `tokens` [..., L] for the masked-LM task and corrupts them.

    In each row, round(mask_prob * n) of its n candidate positions are chosen (at least one
    when n > 0, at most `max_predictions`) uniformly without replacement, as in BERT's
    `create_pretraining_data`; candidates are all positions whose token is not in
    `special_ids` (padding, [CLS], [SEP], ...; `mask_id` is always special). Of the chosen
    positions, a fraction `mask_token_prob` becomes `mask_id`, `random_token_prob` a token
    drawn uniformly from the non-special ids, and the rest keep their token.

    With `word_starts` [..., L] (True at the first piece of each word, False at its
    continuations, e.g. WordPiece's '##' pieces) whole words are chosen: words in random order
    until the next one would exceed the row's budget, so a word is never split.

    Packed rows give `pack_ids` [..., L] (0 at padding, 1..k for the row's packed sequences,
    k <= `max_sequences`; a larger id is never chosen): each packed sequence then draws as a
    row of its own would (its own count, budget and cap), so packing leaves the statistics of
    every sequence as they are unpacked.

    Returns (inputs [..., L] int32, targets [..., L] int32: the original token at chosen
    positions and 0 elsewhere, weights [..., L] float32: 1 at chosen positions, 0 elsewhere).
    """
    _fraction("mask_prob", mask_prob, open_low=True)
    _fraction("mask_token_prob", mask_token_prob)
    _fraction("random_token_prob", random_token_prob)
    if mask_token_prob + random_token_prob > 1:
        raise ValueError(f"mask_token_prob + random_token_prob = "
                         f"{mask_token_prob + random_token_prob} > 1")
    if max_predictions is not None and not (isinstance(max_predictions, numbers.Integral)
                                            and max_predictions > 0):
        raise ValueError(f"max_predictions={max_predictions!r}: must be a positive integer")
    special = np.unique(np.asarray([*special_ids, mask_id], np.int32))
    if special.min() < 0 or special.max() >= vocab_size:
        raise ValueError(f"special ids {special.tolist()} are not all in [0, {vocab_size})")
    ordinary = np.setdiff1d(np.arange(vocab_size), special).astype(np.int32)
    if len(ordinary) == 0:
        raise ValueError(f"a vocabulary of {vocab_size} ids holds only special tokens")

    if pack_ids is not None and not (isinstance(max_sequences, numbers.Integral)
                                     and max_sequences > 0):
        raise ValueError(f"max_sequences={max_sequences!r}: packed rows (pack_ids) need a "
                         f"positive integer")

    tokens = jnp.asarray(tokens, jnp.int32)
    choose_rng, kind_rng, random_rng = jax.random.split(rng, 3)
    candidate = ~jnp.isin(tokens, jnp.asarray(special))
    if word_starts is not None:
        word_starts = jnp.asarray(word_starts, bool)
    if pack_ids is not None:  # one row [..., M, L] per packed sequence, its candidates only
        in_sequence = jnp.asarray(pack_ids)[..., None, :] == jnp.arange(1, max_sequences + 1)[
            :, None]
        candidate = candidate[..., None, :] & in_sequence
        if word_starts is not None:
            word_starts = jnp.broadcast_to(word_starts[..., None, :], candidate.shape)
    n = jnp.sum(candidate, -1)
    k = jnp.maximum(jnp.round(n * mask_prob), jnp.minimum(n, 1)).astype(jnp.int32)
    if max_predictions is not None:
        k = jnp.minimum(k, max_predictions)
    if word_starts is None:
        chosen = _choose_positions(choose_rng, candidate, k)
    else:
        chosen = _choose_words(choose_rng, candidate, word_starts, k)
    if pack_ids is not None:
        chosen = jnp.any(chosen, -2)

    u = jax.random.uniform(kind_rng, tokens.shape)
    random_tokens = jnp.asarray(ordinary)[
        jax.random.randint(random_rng, tokens.shape, 0, len(ordinary))]
    inputs = jnp.where(chosen & (u < mask_token_prob), mask_id, tokens)
    inputs = jnp.where(chosen & (u >= mask_token_prob)
                       & (u < mask_token_prob + random_token_prob), random_tokens, inputs)
    return inputs, jnp.where(chosen, tokens, 0), chosen.astype(jnp.float32)


def _rank(scores):
    """The rank of each entry along the last axis (0: the smallest)."""
    return jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)


def _choose_positions(rng, candidate_BxL, k_B):
    scores = jnp.where(candidate_BxL, jax.random.uniform(rng, candidate_BxL.shape), 2.0)
    return _rank(scores) < k_B[..., None]


def _choose_words(rng, candidate_BxL, word_starts_BxL, k_B):
    """Whole words (a start and its continuations; a special token is a word of its own, and a
    word with a special piece is no candidate) in random order, while their pieces fit in k."""
    L = candidate_BxL.shape[-1]
    word_BxL = jnp.cumsum(word_starts_BxL | ~candidate_BxL, axis=-1) - 1
    word_BxL = jnp.maximum(word_BxL, 0)  # continuation pieces before any start join word 0
    count = lambda values: jax.vmap(lambda w, x: jnp.zeros(L, jnp.int32).at[w].add(x))(
        word_BxL.reshape(-1, L), values.reshape(-1, L)).reshape(candidate_BxL.shape)
    pieces_BxW = count(jnp.ones_like(word_BxL))
    blocked_BxW = count((~candidate_BxL).astype(jnp.int32)) > 0
    eligible_BxW = (pieces_BxW > 0) & ~blocked_BxW
    scores = jnp.where(eligible_BxW, jax.random.uniform(rng, eligible_BxW.shape), 2.0)
    order = jnp.argsort(scores, axis=-1)
    sorted_pieces = jnp.take_along_axis(jnp.where(eligible_BxW, pieces_BxW, 0), order, -1)
    fits_sorted = (jnp.cumsum(sorted_pieces, -1) <= k_B[..., None]) & (sorted_pieces > 0)
    chosen_words = jnp.zeros_like(fits_sorted)
    chosen_words = jax.vmap(lambda c, o, f: c.at[o].set(f))(
        chosen_words.reshape(-1, L), order.reshape(-1, L), fits_sorted.reshape(-1, L))
    chosen_words = chosen_words.reshape(candidate_BxL.shape)
    return jnp.take_along_axis(chosen_words, word_BxL, -1) & candidate_BxL
