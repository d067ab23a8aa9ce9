"""The recurrent encoder-decoder with additive (Bahdanau) attention, the textbook's
`Seq2SeqEncoder` and `Seq2SeqAttentionDecoder`, for use in `transformer.EncoderDecoder`.

Dimension letters: B batch, S source length, T target length, E embedding, H hidden, V
vocabulary.

The encoder is an embedding and a stack of recurrent layers over the valid part of each
source (outputs at padded positions are zero, and each layer's final state is the one at
its sequence's own last token). At every target step the decoder attends over the encoder
outputs with the previous step's top-layer hidden state as the query, feeds the context
concatenated with the embedded input token to its recurrent stack, and predicts the next
token from the top layer's output. The decoder's memory is (encoder outputs, source
lengths, hidden states): decoding one token at a time and decoding a whole target at once
run the same step.

`bidirectional=True` is Bahdanau et al. (2015)'s encoder: every layer runs forward and
backward over the valid part of each source (`StackedRecurrent(bidirectional=True)`; the
backward direction starts at each sequence's own last token), the annotations are the two
directions' outputs concatenated, [B, S, 2H] (zero at padded positions), and the decoder's
initial state is s_0 = tanh(W_s h_1^backward + b_s), one learned projection per layer
(`init_proj_{i}`, Dense H -> H) from that layer's backward final state (see
`Seq2SeqEncoder`). The decoder's additive attention projects the 2H-wide keys to its own
width, so the decoder is the same module either way. The default (unidirectional, the
textbook's) has no projections and passes the encoder's final states on unchanged.
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from seqjax.nn import compute
from seqjax.nn.attention import AdditiveAttention
from seqjax.nn.recurrent import CELLS, StackedRecurrent

Dtype = Any


class _Seq2Seq(nn.Module):
    """The hyperparameters shared by the encoder and the decoder."""

    vocab_size: int
    embed_size: int = 256
    num_hiddens: int = 256
    num_layers: int = 2
    cell: str = "gru"
    dropout_rate: float = 0.0
    remat: str = "none"  # the encoder's recurrent layers', see seqjax.nn.compute
    bidirectional: bool = False  # the encoder's (Bahdanau et al. 2015); the decoder ignores it
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32


class Seq2SeqEncoder(_Seq2Seq):
    """Source tokens [B, S] with lengths [B] -> (outputs [B, S, H], the decoder's initial
    carries, one per layer).

    Unidirectional: the outputs and the final carries of the recurrent stack.

    Bidirectional: outputs [B, S, 2H], each position's [forward, backward] outputs (zero at
    padded positions), and as the decoder's initial carry of layer i, s_0 = tanh(W_s h + b_s)
    (`init_proj_{i}`, Dense H -> H) of h, layer i's backward final state (its state after the
    source's first token: Bahdanau et al.'s h_1^backward). For an LSTM the projection gives h
    and the cell state c starts at zeros: the paper's s_0 is the state the gates and the
    attention query read, and it has no counterpart for c. The projections are the encoder's
    parameters (the paper counts W_s with the decoder) because the decoder's memory is made by
    a function without parameters (`init_state`).
    """

    @nn.compact
    def __call__(self, tokens_BxS, valid_len_B=None, *, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x_BxSxE = nn.Embed(self.vocab_size, self.embed_size, name="embed", **kw)(tokens_BxS)
        carries, outputs_BxSxH = StackedRecurrent(
            self.cell, self.num_hiddens, num_layers=self.num_layers,
            dropout_rate=self.dropout_rate, bidirectional=self.bidirectional,
            remat=self.remat, name="rnn", **kw)(
                x_BxSxE, seq_lengths=valid_len_B, deterministic=deterministic)
        if self.bidirectional:
            carries = tuple(self._initial_carry(i, bwd) for i, (_, bwd) in enumerate(carries))
        return outputs_BxSxH, carries

    @nn.nowrap
    def _initial_carry(self, i, backward_carry):
        """The decoder's initial carry of layer i from that layer's backward final carry."""
        lstm = self.cell == "lstm"
        h_BxH = backward_carry[1] if lstm else backward_carry
        s0_BxH = jnp.tanh(nn.Dense(self.num_hiddens, name=f"init_proj_{i}", dtype=self.dtype,
                                   param_dtype=self.param_dtype)(h_BxH)).astype(h_BxH.dtype)
        return (jnp.zeros_like(s0_BxH), s0_BxH) if lstm else s0_BxH


class _AttentionStep(nn.Module):
    """One decoder step: (carries, input x [B, E]) -> (carries, top-layer output [B, H])."""

    num_hiddens: int
    num_layers: int
    cell: str
    dropout_rate: float
    deterministic: bool
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carries, x_BxE, enc_outputs_BxSxH, src_valid_len_B):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        top = carries[-1][1] if self.cell == "lstm" else carries[-1]  # an LSTM carry is (c, h)
        context_Bx1xH = AdditiveAttention(self.num_hiddens, name="attention", **kw)(
            top[:, None], enc_outputs_BxSxH, enc_outputs_BxSxH, src_valid_len_B)
        x = jnp.concatenate([context_Bx1xH[:, 0].astype(x_BxE.dtype), x_BxE], axis=-1)
        new_carries = []
        for i, carry in enumerate(carries):
            if i > 0:
                x = nn.Dropout(self.dropout_rate)(x, deterministic=self.deterministic)
            carry, x = CELLS[self.cell](self.num_hiddens, name=f"layer_{i}", **kw)(carry, x)
            new_carries.append(carry)
        return tuple(new_carries), x


class Seq2SeqAttentionDecoder(_Seq2Seq):
    """Target tokens [B, T] and memory -> (logits [B, T, V] in float32, memory after them).

    The attention weights of every step are sown into 'intermediates' under
    `step/attention/attention_weights`, stacked over time: [T, B, 1, S].
    """

    @nn.nowrap
    def init_state(self, encoder_outputs, src_valid_len_B):
        """Memory: (encoder outputs [B, S, H] (2H when bidirectional), source lengths [B], the
        decoder's initial carries from the encoder)."""
        outputs_BxSxH, carries = encoder_outputs
        return outputs_BxSxH, jnp.asarray(src_valid_len_B), carries

    @nn.compact
    def __call__(self, tokens_BxT, memory, *, deterministic: bool = True):
        if self.cell not in CELLS:
            raise ValueError(f"cell={self.cell!r}: expected one of {sorted(CELLS)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        enc_outputs_BxSxH, src_valid_len_B, carries = memory
        x_BxTxE = nn.Embed(self.vocab_size, self.embed_size, name="embed", **kw)(tokens_BxT)
        steps = nn.scan(_AttentionStep, variable_broadcast="params",
                        variable_axes={"intermediates": 0},
                        split_rngs={"params": False, "dropout": True},
                        in_axes=(1, nn.broadcast, nn.broadcast), out_axes=1)
        carries, y_BxTxH = steps(self.num_hiddens, self.num_layers, self.cell, self.dropout_rate,
                                 deterministic, name="step", **kw)(
            carries, x_BxTxE, enc_outputs_BxSxH, src_valid_len_B)
        logits_BxTxV = nn.Dense(self.vocab_size, name="head", dot_general=compute.float32_dot,
                                **kw)(y_BxTxH)
        return logits_BxTxV.astype(jnp.float32), (enc_outputs_BxSxH, src_valid_len_B, carries)
