"""Bahdanau et al. (2015)'s bidirectional encoder for the recurrent encoder-decoder
(`config.model.bidirectional`), against a naive reference: each recurrent cell applied one step
at a time in a Python loop, forward over each sequence's valid prefix and backward over it
reversed, and the decoder's initial state s_0 = tanh(W_s h_1^backward + b_s) by hand.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn.recurrent import CELLS
from seqjax.nn.seq2seq import Seq2SeqAttentionDecoder, Seq2SeqEncoder
from seqjax.nn.transformer import EncoderDecoder
from seqjax.train.loop import train_and_evaluate

from conftest import load_config

SRC_V, TGT_V, S, T, E, H, LAYERS = 13, 11, 7, 5, 8, 12, 2
LENGTHS = np.array([S, 4, 1], np.int32)  # different valid lengths, one without padding


def _model(cell, bidirectional=True):
    hp = dict(num_layers=LAYERS, embed_size=E, num_hiddens=H, cell=cell)
    return EncoderDecoder(Seq2SeqEncoder(SRC_V, bidirectional=bidirectional, **hp),
                          Seq2SeqAttentionDecoder(TGT_V, **hp))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, SRC_V, (len(LENGTHS), S)).astype(np.int32)
    tgt = rng.integers(0, TGT_V, (len(LENGTHS), T)).astype(np.int32)
    return src, LENGTHS, tgt


def _init(cell, bidirectional=True):
    model = _model(cell, bidirectional)
    src, src_len, tgt = _inputs()
    return model, model.init(jax.random.PRNGKey(3), src, src_len, tgt)


def _run_by_hand(cell, params, x_NxF, reverse):
    """One direction of one layer over one sequence's valid part x_NxF, one cell step at a
    time: (outputs [N, H] in the original time order, final carry)."""
    module = CELLS[cell](H)
    carry = module.initialize_carry(None, (1, x_NxF.shape[-1]))
    order = range(len(x_NxF) - 1, -1, -1) if reverse else range(len(x_NxF))
    outputs = [None] * len(x_NxF)
    for t in order:
        carry, y_1xH = module.apply({"params": params}, carry, x_NxF[t][None])
        outputs[t] = np.asarray(y_1xH[0])
    return np.stack(outputs) if outputs else np.zeros((0, H)), carry


def _encode_by_hand(cell, params, src, src_len):
    """For each sequence: (annotations [n, 2H] at its valid positions, backward final carry
    of each layer), every layer fed the previous layer's concatenated [forward, backward]
    outputs, as `StackedRecurrent(bidirectional=True)` does."""
    enc = params["params"]["encoder"]
    table = np.asarray(enc["embed"]["embedding"])
    results = []
    for tokens, n in zip(src, src_len):
        x, backward_carries = table[tokens[:n]], []
        for i in range(LAYERS):
            rnn = enc["rnn"]
            y_fwd, _ = _run_by_hand(cell, rnn[f"layer_{i}_fwd"], x, reverse=False)
            y_bwd, carry_bwd = _run_by_hand(cell, rnn[f"layer_{i}_bwd"], x, reverse=True)
            x = np.concatenate([y_fwd, y_bwd], -1)
            backward_carries.append(carry_bwd)
        results.append((x, backward_carries))
    return results


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_bidirectional_annotations_equal_forward_and_backward_runs_by_hand(cell):
    model, params = _init(cell)
    src, src_len, _ = _inputs(seed=1)
    outputs_BxSx2H, _ = model.apply(params, src, src_len, method=lambda m, s, n: m.encoder(s, n))
    outputs_BxSx2H = np.asarray(outputs_BxSx2H)
    assert outputs_BxSx2H.shape == (len(src), S, 2 * H)
    for b, (annotations, _) in enumerate(_encode_by_hand(cell, params, src, src_len)):
        n = src_len[b]
        np.testing.assert_allclose(outputs_BxSx2H[b, :n], annotations, rtol=1e-5, atol=1e-5)
        assert np.all(outputs_BxSx2H[b, n:] == 0), "padded positions must be zero"
    # as in the unidirectional encoder
    uni, uni_params = _init(cell, bidirectional=False)
    uni_out, _ = uni.apply(uni_params, src, src_len, method=lambda m, s, n: m.encoder(s, n))
    assert uni_out.shape == (len(src), S, H)
    assert all(np.all(np.asarray(uni_out)[b, n:] == 0) for b, n in enumerate(src_len))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_decoder_initial_state_is_tanh_of_a_projection_of_the_backward_final_state(cell):
    model, params = _init(cell)
    src, src_len, _ = _inputs(seed=2)
    _, _, carries = model.apply(params, src, src_len, method=model.encode)
    enc = params["params"]["encoder"]
    by_hand = _encode_by_hand(cell, params, src, src_len)
    assert len(carries) == LAYERS
    for i, carry in enumerate(carries):
        proj = enc[f"init_proj_{i}"]
        assert proj["kernel"].shape == (H, H) and proj["bias"].shape == (H,)
        if cell == "lstm":  # (c, h): h from the projection, the cell state c starts at zero
            c_BxH, s0_BxH = carry
            assert c_BxH.shape == (len(src), H) and np.all(np.asarray(c_BxH) == 0)
        else:
            s0_BxH = carry
        assert s0_BxH.shape == (len(src), H) and s0_BxH.dtype == jnp.float32
        for b, (_, backward_carries) in enumerate(by_hand):
            h_back = backward_carries[i][1] if cell == "lstm" else backward_carries[i]
            expected = np.tanh(np.asarray(h_back[0]) @ np.asarray(proj["kernel"])
                               + np.asarray(proj["bias"]))
            np.testing.assert_allclose(s0_BxH[b], expected, rtol=1e-5, atol=1e-5)
    # the decoder's additive attention projects the 2H-wide annotations to its own width
    attention = params["params"]["decoder"]["step"]["attention"]
    assert attention["W_k"]["kernel"].shape == (2 * H, H)
    assert attention["W_q"]["kernel"].shape == (H, H)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_unidirectional_default_has_no_projection_and_passes_the_final_states_on(cell):
    """The textbook's encoder, unchanged: no projections, outputs [B, S, H], and the decoder
    starts from each layer's final (forward) state at the sequence's own last token."""
    assert Seq2SeqEncoder(SRC_V).bidirectional is False
    model, params = _init(cell, bidirectional=False)
    enc = params["params"]["encoder"]
    assert set(enc) == {"embed", "rnn"}
    assert set(enc["rnn"]) == {f"layer_{i}" for i in range(LAYERS)}
    src, src_len, _ = _inputs(seed=3)
    outputs_BxSxH, _, carries = model.apply(params, src, src_len, method=model.encode)
    table = np.asarray(enc["embed"]["embedding"])
    for b, (tokens, n) in enumerate(zip(src, src_len)):
        x = table[tokens[:n]]
        for i in range(LAYERS):
            x, carry = _run_by_hand(cell, enc["rnn"][f"layer_{i}"], x, reverse=False)
            for got, want in zip(jax.tree.leaves(carries[i]), jax.tree.leaves(carry)):
                np.testing.assert_allclose(got[b], want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(outputs_BxSxH[b, :n], x, rtol=1e-5, atol=1e-5)


def test_tiny_bidirectional_translation_run_trains_evaluates_and_decodes(tmp_path):
    config = load_config("translate", "tiny,model=seq2seq_attention")
    config.model.bidirectional = True
    config.model.num_layers = 2
    workdir = tmp_path / "run"
    metrics = train_and_evaluate(config, str(workdir))
    assert metrics["step"] == config.num_train_steps
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    final = [r for r in rows if r.get("split") == "val" and "test_bleu_greedy" in r]
    assert len(final) == 1
    for key in ("bleu", "test_bleu_greedy", "test_bleu_beam2"):
        assert 0 <= final[0][key] <= 100
    assert (workdir / "test_translations.tsv").read_text().splitlines()[0] == (
        "source\treference\tgreedy\tbeam2")
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["bidirectional"] is True


def test_bidirectional_transformer_is_a_clear_error(tmp_path):
    config = load_config("translate", "tiny")
    assert config.model.name == "transformer"
    config.model.bidirectional = True
    with pytest.raises(ValueError, match=r"config\.model\.bidirectional=True: applies to "
                                         r"model\.name='seq2seq_attention'"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
