"""Sequence packing: first-fit decreasing and packed rows against plain-Python references;
no attention across segments, read off gradients (full and block-local attention, encoder,
decoder self- and cross-attention); every sequence's loss and gradient packed equal to
unpacked (translation; BERT's MLM and NSP); the mask drawn per packed sequence; the tasks'
wiring; config errors. Compilation is most of the time: tiny models, parameters from
`eval_shape`, one jitted function per check."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import config as config_lib
from seqjax.data import masking
from seqjax.data import pretraining as bert_data
from seqjax.data import translation as translation_data
from seqjax.data.packing import Packing, first_fit
from seqjax.nn.attention import (
    dot_product_attention,
    fused_attention,
    local_attention,
    local_window_mask,
    segment_mask,
)
from seqjax.nn.bert import BertEncoder, BertPretraining
from seqjax.nn.transformer import EncoderDecoder, TransformerDecoder, TransformerEncoder
from seqjax.tasks import bert, translation

from conftest import load_config

# ----------------------------------------------------------------------------- packing


def span(length, capacity, align):
    return min(-(-length // align) * align, capacity)


def reference_first_fit(lengths, capacity, max_per_row=None, align=1):
    """First-fit decreasing with a loop over the rows for every sequence: the longest first
    (by the sum of its parts' spans), each into the first row with room for every part."""
    spans = [[span(n, c, align) for n, c in zip(parts, capacity)] for parts in lengths]
    rooms, counts, row_of = [], [], [None] * len(lengths)
    for n in sorted(range(len(lengths)), key=lambda n: -sum(spans[n])):
        r = next((r for r in range(len(rooms))
                  if all(s <= room for s, room in zip(spans[n], rooms[r]))
                  and (max_per_row is None or counts[r] < max_per_row)), len(rooms))
        if r == len(rooms):
            rooms.append(list(capacity))
            counts.append(0)
        rooms[r] = [room - s for room, s in zip(rooms[r], spans[n])]
        counts[r] += 1
        row_of[n] = r
    return row_of


def reference_rows(row_of, sequences, length, align, fill):
    """(tokens, segment ids, positions) of each row as lists: its sequences in index order,
    each starting where the span of the one before ends."""
    R = max(row_of) + 1
    rows = [[[v] * length for _ in range(R)] for v in (fill, 0, 0)]
    end, count = [0] * R, [0] * R
    for sequence, r in zip(sequences, row_of):
        count[r] += 1
        for i, token in enumerate(sequence):
            for out, value in zip(rows, (token, count[r], i)):
                out[r][end[r] + i] = value
        end[r] += span(len(sequence), length, align)
    return rows


@pytest.mark.parametrize("capacity, max_per_row, align", [
    ((10,), None, 1), ((10,), 3, 1), ((10, 7), None, 1), ((10, 7), 4, 3)])
def test_first_fit_and_packed_rows_match_plain_python(capacity, max_per_row, align):
    rng = np.random.default_rng(len(capacity) + align)
    N = 300
    lengths = np.stack([1 + rng.integers(0, c, N) // 2 for c in capacity], 1)  # 1..c/2+1
    flat = len(capacity) == 1
    row = first_fit(lengths[:, 0] if flat else lengths, capacity[0] if flat else capacity,
                    max_per_row, align)
    expected_rows = reference_first_fit(lengths.tolist(), capacity, max_per_row, align)
    assert row.tolist() == expected_rows
    assert row.max() + 1 < N / 1.5  # short sequences share rows
    for k, length in enumerate(capacity):
        sequences = [rng.integers(2, 50, n).tolist() for n in lengths[:, k]]
        padded = np.asarray([sequence + [-7] * (length - len(sequence)) for sequence in sequences])
        packed = Packing(row, lengths[:, k], length, align)
        assert [packed.tokens(padded, fill=1).tolist(), packed.segment_ids().tolist(),
                packed.positions().tolist()] == reference_rows(expected_rows, sequences,
                                                               length, align, 1)
    M = max_per_row or length
    table = packed.per_sequence(np.arange(N) + 100, M, fill=-1)
    for r in range(row.max() + 1):
        mine = [n + 100 for n in range(N) if expected_rows[n] == r]
        assert table[r].tolist() == mine + [-1] * (M - len(mine))


@pytest.mark.parametrize("call, message", [
    (lambda: first_fit([3, 9], 8), r"sequence 1 has lengths \[9\]"),
    (lambda: first_fit([0, 2], 8), "sequence 0"),
    (lambda: first_fit([1, 2], 8, max_per_row=0), "max_per_row=0"),
    (lambda: Packing([0, 0], [3, 2], 4), "hold more than 4"),
    (lambda: Packing([0, 0], [1, 1], 4).per_sequence([5, 6], 1), "max_per_row=1")])
def test_bad_lengths_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _pairs(N, T, seed):
    """build_array's arrays of N random pairs of short sentences (ids 4..19)."""
    rng = np.random.default_rng(seed)
    return tuple(a for _ in range(2) for a in translation_data.build_array(
        [rng.integers(4, 20, rng.integers(1, T)).tolist() for _ in range(N)], T))


# ----------------------------------------------------------------------------- attention

# Rows of 12: target segments of 3, 5, 2 tokens (then padding) and of 7, 5; their sources.
TARGETS = Packing([0, 0, 0, 1, 1], [3, 5, 2, 7, 5], 12)
SEGMENTS, POSITIONS = TARGETS.segment_ids(), TARGETS.positions()
SRC_SEGMENTS = Packing([0, 0, 0, 1, 1], [2, 3, 4, 4, 7], 12).segment_ids()


def dependence(f, masks_PxBxN, *xs):
    """For each x of xs, [P, *x.shape[:-1]] bool: whether the weighted sum of the outputs of
    f(*xs) [B, N, ...] over each of the P masks depends on each entry of x (any of its last
    axis), read off the Jacobian."""
    r = jax.random.normal(jax.random.PRNGKey(1), jax.eval_shape(f, *xs).shape)
    sums = lambda *xs: jnp.einsum("pbn,bn...->p", masks_PxBxN, f(*xs) * r)  # noqa: E731
    jacobians = jax.jit(jax.jacrev(sums, argnums=tuple(range(len(xs)))))(*xs)
    return [np.abs(np.asarray(j)).max(-1) > 0 for j in jacobians]


@pytest.mark.parametrize("kind", ["seqjax", "xla", "local", "local_causal"])
def test_no_attention_across_segments(kind):
    x = np.random.default_rng(0).normal(size=(2, 12, 2, 4)).astype(np.float32)
    band = True
    if kind == "seqjax":
        f = lambda x: dot_product_attention(x, x, x, mask=segment_mask(SEGMENTS))  # noqa: E731
    elif kind == "xla":
        f = lambda x: fused_attention(x, x, x, implementation="xla",  # noqa: E731
                                      segment_ids=SEGMENTS)
    else:  # blocks of 4 across segment boundaries, one block a scan step
        causal = kind == "local_causal"
        band = local_window_mask(12, 4, look_back=1, causal=causal)
        f = lambda x: local_attention(x, x, x, block_size=4, look_back=1,  # noqa: E731
                                      causal=causal, segment_ids=SEGMENTS, blocks_per_step=1)
    allowed_BxNxN = ((SEGMENTS[:, :, None] == SEGMENTS[:, None, :])
                     & (SEGMENTS[:, None, :] > 0) & band)
    # Output (b, i) depends on input (b', j) iff b' = b and query i may see key j.
    queries = np.eye(24, dtype=bool).reshape(24, 2, 12)
    [depends] = dependence(f, queries, x)
    expected = np.eye(2, dtype=bool)[:, None, :, None] & allowed_BxNxN[:, :, None, :]
    np.testing.assert_array_equal(depends.any(-1), expected.reshape(24, 2, 12))
    reference = dot_product_attention(x, x, x, mask=allowed_BxNxN[:, None])
    np.testing.assert_allclose(jax.jit(f)(x), reference, atol=1e-5)


def disjoint_tokens(segments_BxN):
    """Token ids [B, N] (4..33) that no two (row, segment) pairs share; padding is id 1."""
    B, N = segments_BxN.shape
    ids = 4 + 5 * (3 * np.arange(B)[:, None] + segments_BxN - 1) + np.arange(N) % 5
    return np.where(segments_BxN > 0, ids, 1).astype(np.int32)


def in_segment(b, s, segments_BxN):
    """[B, N]: the positions of segment s of row b."""
    return (segments_BxN == s) & (np.arange(len(segments_BxN)) == b)[:, None]


PAIRS = [(b, s) for b, row in enumerate(SEGMENTS) for s in np.unique(row) if s]
MASKS = np.stack([in_segment(b, s, SEGMENTS) for b, s in PAIRS])  # [pairs, B, N]


def tokens_of(tokens_BxN, V):
    """[pairs, V]: the token ids of each (row, segment) pair."""
    return np.stack([np.bincount(tokens_BxN[m], minlength=V) > 0 for m in MASKS])


def random_params(init, *args):
    """Variables shaped like init(key, *args)'s, filled with N(0, 0.3^2) (nonzero biases and
    LayerNorm offsets included): traced by `eval_shape`, never compiled."""
    rng = np.random.default_rng(3)
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype),
                        jax.eval_shape(init, jax.random.PRNGKey(0), *args))


def with_embedding(params, embedding):
    return {"params": {**params["params"], "embed": {"embedding": embedding}}}


V = 40
TINY = dict(num_layers=2, d_model=8, num_heads=2, ffn_hiddens=16, max_length=12, block_size=4,
            look_back=1)


def test_encoder_outputs_of_a_segment_do_not_depend_on_other_segments_tokens():
    tokens = disjoint_tokens(SEGMENTS)
    model = TransformerEncoder(V, position="learned", **TINY)
    params = random_params(model.init, tokens)
    [depends] = dependence(
        lambda e: model.apply(with_embedding(params, e), tokens, segment_ids=SEGMENTS,
                              positions=POSITIONS),
        MASKS, params["params"]["embed"]["embedding"])
    np.testing.assert_array_equal(depends, tokens_of(tokens, V))


def test_decoder_segment_depends_on_its_own_target_tokens_and_source_segment_only():
    """Block-local causal self-attention (blocks of 4 across segment boundaries) and full
    cross-attention."""
    tokens = disjoint_tokens(SEGMENTS)
    model = TransformerDecoder(V, attention="local", **TINY)
    memory = jax.random.normal(jax.random.PRNGKey(2), (2, 12, 8))
    params = random_params(model.init, tokens, (memory, None))

    def decode(embedding, memory):
        return model.apply(with_embedding(params, embedding), tokens, (memory, None),
                           segment_ids=SEGMENTS, memory_segment_ids=SRC_SEGMENTS,
                           positions=POSITIONS)[0]

    on_tokens, on_memory = dependence(decode, MASKS, params["params"]["embed"]["embedding"],
                                      memory)
    # Self-attention: target tokens of the segment's own pair only.
    np.testing.assert_array_equal(on_tokens, tokens_of(tokens, V))
    # Cross-attention: target segment s of row b reads source segment s of row b only.
    np.testing.assert_array_equal(on_memory,
                                  np.stack([in_segment(b, s, SRC_SEGMENTS) for b, s in PAIRS]))


# ----------------------------------------------------------------------------- losses


def assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
    """Every leaf of a close to b's, relative to the largest entry of b's leaf."""
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        x, y, rtol=0, atol=atol + rtol * np.abs(np.asarray(y)).max()), a, b)


def per_sequence(loss_fn, params, batch, **one_per_sequence):
    """(sums, gradients of sums['loss']) of `batch` with each entry of `one_per_sequence`'s
    arrays (stacked on a first axis: one sequence's weights) in place of its own: one jitted
    vmap."""
    def one(weights):
        def loss(params):
            sums = loss_fn(params, {**batch, **weights})[0]
            return sums["loss"], sums
        grads, sums = jax.grad(loss, has_aux=True)(params)
        return sums, grads
    return jax.jit(jax.vmap(one))(one_per_sequence)


def test_packed_translation_gives_each_pair_its_unpacked_loss_and_gradient():
    """One model with seqjax's full attention and sinusoidal positions in the encoder, and
    block-local self-attention, rotary positions and XLA's fused cross-attention in the
    decoder. Loss equality per pair also shows that `pack_pairs` keeps a pair's source and
    target under one segment number, with positions from 0, and that teacher forcing restarts
    with <bos> at each pair."""
    T, N, align = 8, 7, 4  # sentences start at block boundaries, as tasks.common.pack_align
    src, src_len, tgt, tgt_len = _pairs(N, T, seed=1)
    hp = dict(TINY, num_layers=1, d_model=16, max_length=T)
    model = EncoderDecoder(
        TransformerEncoder(20, **hp),
        TransformerDecoder(20, **hp, position="rotary", attention="local", attention_impl="xla"))
    unpacked = translation_data.teacher_forcing(dict(src=src, src_len=src_len, tgt=tgt,
                                                     tgt_len=tgt_len))
    packed = translation_data.teacher_forcing(
        translation_data.pack_pairs(src, src_len, tgt, tgt_len, align=align))
    assert (R := len(packed["src"])) < N
    params = random_params(model.init, src[:1], src_len[:1], unpacked["tgt_in"][:1])
    # Pair n alone: its target tokens' weights only, unpacked (row n) and packed (its segment).
    row_N = first_fit(np.stack([src_len, tgt_len], 1), (T, T), align=align)
    packed_weights = np.stack([(np.arange(R) == r)[:, None] & (packed["tgt_segment_ids"] == s)
                               for r, s in zip(row_N, Packing(row_N, tgt_len, T, align).segment_N)])
    loss = functools.partial(translation.loss, model)
    sums, grads = per_sequence(loss, params, unpacked,
                               weights=np.eye(N)[:, :, None] * unpacked["weights"])
    packed_sums, packed_grads = per_sequence(loss, params, packed,
                                             weights=packed_weights.astype(np.float32))
    np.testing.assert_allclose(packed_sums["loss"], sums["loss"], rtol=1e-5)
    np.testing.assert_array_equal(packed_sums["weight"], tgt_len)
    np.testing.assert_array_equal(packed_sums["accuracy"], sums["accuracy"])
    assert_trees_close(packed_grads, grads)


def _bert_arrays(N, L, seed):
    """pretraining_arrays-like sequences `[CLS] A [SEP] B [SEP]` of 2..4-token halves (ids
    5..29), NSP labels, and a fixed MLM draw: 1 or 2 chosen positions each."""
    rng = np.random.default_rng(seed)
    arrays = dict(tokens=np.zeros((N, L), np.int32), segments=np.zeros((N, L), np.int32),
                  valid_len=np.zeros(N, np.int32), nsp_label=rng.integers(0, 2, N))
    chosen = np.zeros((N, L), bool)
    for n in range(N):
        a, b = (rng.integers(5, 30, rng.integers(2, 5)).tolist() for _ in range(2))
        ids = [bert_data.CLS_ID, *a, bert_data.SEP_ID, *b, bert_data.SEP_ID]
        arrays["tokens"][n, :len(ids)] = ids
        arrays["segments"][n, len(a) + 2:len(ids)] = 1
        arrays["valid_len"][n] = len(ids)
        chosen[n, rng.choice([i for i, t in enumerate(ids) if t >= 5], rng.integers(1, 3),
                             replace=False)] = True
    mlm = dict(inputs=np.where(chosen, bert_data.MASK_ID, arrays["tokens"]),
               targets=np.where(chosen, arrays["tokens"], 0), weights=chosen.astype(np.float32))
    return arrays, mlm


def test_packed_bert_gives_each_sequence_its_unpacked_mlm_nsp_loss_and_gradient():
    N, L, M = 7, 16, 3
    arrays, mlm = _bert_arrays(N, L, seed=4)
    model = BertPretraining(BertEncoder(30, num_layers=1, d_model=16, num_heads=2, ffn_hiddens=32,
                                        max_length=L, dropout_rate=0.0,
                                        attention_dropout_rate=0.0))
    packed = bert_data.pack_pretraining(arrays, M)
    row_N = first_fit(arrays["valid_len"], L, max_per_row=M)
    where = Packing(row_N, arrays["valid_len"], L)
    np.testing.assert_array_equal(where.tokens(arrays["tokens"]), packed["tokens"])
    assert (R := len(packed["tokens"])) < N
    params = random_params(model.init, arrays["tokens"][:1], arrays["segments"][:1], None,
                           np.zeros((1, 2), np.int32))
    loss = functools.partial(bert.pretraining_loss, model, draw_mask=None, max_predictions=L,
                             packed_predictions=L)
    # Sequence n alone: unpacked, row_weight picks its row; packed, its chosen positions and
    # its NSP slot.
    sums, grads = per_sequence(loss, params, {**arrays, **mlm},
                               row_weight=np.eye(N, dtype=np.float32))
    rows = [(np.arange(R) == r)[:, None] for r in row_N]
    packed_sums, packed_grads = per_sequence(
        loss, params, {**packed, **{k: where.tokens(mlm[k]) for k in ("inputs", "targets")}},
        weights=np.stack([where.tokens(mlm["weights"]) * (row & (packed["pack_ids"] == s))
                          for row, s in zip(rows, where.segment_N)]),
        nsp_weight=np.stack([row & (np.arange(M) == s - 1)
                             for row, s in zip(rows, where.segment_N)]).astype(np.float32))
    for key in ("mlm_loss", "nsp_loss"):
        np.testing.assert_allclose(packed_sums[key], sums[key], rtol=1e-5)
    for key in ("weight", "mlm_accuracy", "nsp_accuracy", "sequences"):
        np.testing.assert_array_equal(packed_sums[key], sums[key])
    assert_trees_close(packed_grads, grads)


@pytest.mark.parametrize("whole_word", [False, True])
def test_packed_mask_draws_each_sequence_as_it_would_alone(whole_word):
    M = 4
    packed = bert_data.pack_pretraining(_bert_arrays(40, 24, seed=5)[0], M)
    tokens, pack_ids = packed["tokens"], packed["pack_ids"]
    word_starts = np.random.default_rng(6).random(tokens.shape) < 0.6 if whole_word else None
    draw = jax.jit(jax.vmap(lambda key: masking.mask_tokens(
        key, tokens, vocab_size=30, mask_id=bert_data.MASK_ID, special_ids=range(4),
        max_predictions=2, word_starts=word_starts, pack_ids=pack_ids, max_sequences=M)))
    weights = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 8))[2]) > 0
    candidate = tokens >= 5
    assert not weights[:, ~candidate].any()
    for r, s in zip(*np.nonzero(packed["nsp_weight"])):
        in_sequence = pack_ids[r] == s + 1
        n = (candidate[r] & in_sequence).sum()
        k = min(max(round(0.15 * n), min(n, 1)), 2)
        counts = weights[:, r, in_sequence].sum(-1)
        assert (counts <= k).all() if whole_word else (counts == k).all()
        if whole_word:  # a word is chosen whole or not at all
            word = np.cumsum(word_starts[r] | ~candidate[r])
            for w in np.unique(word[in_sequence & candidate[r]]):
                chosen = weights[:, r, word == w]
                assert (chosen.all(-1) | ~chosen.any(-1)).all()


# ----------------------------------------------------------------------------- tasks and config


def test_tiny_packed_tasks_train_on_rows_of_several_sequences():
    """Packed training rows, unpacked evaluation, and BERT's training loss (traced: it draws
    the mask per packed sequence)."""
    config = config_lib.override(load_config("translate", "tiny"), {"data.pack": True})
    task = translation.build(config)
    batch = task.train_batch(0)
    assert set(translation.PACKED_KEYS) <= set(batch) and "src_valid_len" in task.eval_batches[0]
    assert (batch["tgt_segment_ids"].max(1) > 1).any()

    config = config_lib.override(load_config("bert_pretrain", "smoke"),
                                 {"data.pack": True, "data.whole_word": True})
    task = bert.build_pretrain(config)
    batch = task.train_batch(0)
    assert {"pack_ids", "position_ids", "cls_positions", "nsp_weight"} <= set(batch)
    assert "valid_len" not in batch and "valid_len" in task.eval_batches[0]
    sums, _ = jax.eval_shape(functools.partial(task.loss, rng=jax.random.PRNGKey(1), train=True),
                             jax.eval_shape(task.init_params, jax.random.PRNGKey(0)), batch)
    assert {"mlm_loss", "nsp_loss", "sequences"} <= set(sums) and sums["loss"].shape == ()


@pytest.mark.parametrize("name, overrides, message", [
    ("translate:model=seq2seq_attention,tiny", {"data.pack": True},
     "config.data.pack=True: packs several pairs a row for model.name='transformer' only"),
    ("translate:tiny", {"data.pack": True, "model.attention_impl": "cudnn"},
     "config.model.attention_impl='cudnn': takes no segment ids"),
    ("bert_pretrain:smoke", {"data.pack": True, "data.pack_max_sequences": 0},
     "config.data.pack_max_sequences=0: must be a positive integer"),
])
def test_bad_packing_config_is_a_clear_error(name, overrides, message):
    experiment, arg = name.split(":")
    config = config_lib.override(load_config(experiment, arg), overrides)
    check = translation.check_config if experiment == "translate" else bert.check_pretrain
    with pytest.raises(ValueError, match=re.escape(message)):
        check(config)
