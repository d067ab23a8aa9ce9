"""Transformer blocks (Vaswani et al. 2017, the textbook's chapter), the encoder-decoder for
sequence-to-sequence tasks, and a decoder-only LM.

Dimension letters: B batch, L length, S source length, T target length, E model dimension
(`d_model`), V vocabulary.

Every sublayer (self-attention, cross-attention, position-wise FFN) is followed by Add&Norm
(residual plus LayerNorm: `norm='post'`, the original) or preceded by LayerNorm
(`norm='pre'`, which trains deep stacks without warm-up tricks). An `EncoderBlock` with
causal self-attention is a decoder-only (GPT-style) block; a `DecoderBlock` adds
cross-attention to the encoder's output between the two.

Packed rows (several sequences a row, `seqjax.data.packing`) pass segment ids and positions
[B, L]: attention stays within a segment (a target segment's cross-attention within the source
segment of the same number), and positional encodings read each token's own position, so a
packed sequence gets the outputs it gets alone, to float rounding.

Precision: with `dtype=bfloat16` the products run in bfloat16 on float32 parameters
(`param_dtype`), while attention scores and softmax, LayerNorm statistics and the logits stay
in float32. `remat` rematerialises each block (`seqjax.nn.compute`), `attention_impl` picks
full attention's implementation (`seqjax.nn.attention`).
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.nn import compute, position
from seqjax.nn.attention import MultiHeadAttention
from seqjax.nn.transformer_config import (  # noqa: F401  (re-exported)
    ACTIVATIONS,
    NORMS,
    TransformerConfig,
)

Dtype = Any
ACTIVATION_FNS = {"relu": nn.relu, "gelu": nn.gelu,  # GELU's tanh approximation
                  "gelu_exact": functools.partial(nn.gelu, approximate=False)}  # erf: BERT's


class PositionwiseFFN(nn.Module):
    """The same two-layer MLP at every position: Dense(ffn_hiddens) -> activation -> Dense
    (`ACTIVATION_FNS`)."""

    ffn_hiddens: int
    out_features: Optional[int] = None
    activation: str = "relu"
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxE):
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = dense(self.ffn_hiddens, name="dense1")(x_BxLxE)
        hidden = ACTIVATION_FNS[self.activation](hidden)
        return dense(self.out_features or x_BxLxE.shape[-1], name="dense2")(hidden)


class AddNorm(nn.Module):
    """LayerNorm(dropout(Y) + X): the residual connection and layer normalisation."""

    dropout_rate: float = 0.0
    epsilon: float = 1e-6
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, y, *, deterministic: bool = True):
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        return nn.LayerNorm(self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="ln")(x + y)


def _residual(i: int, x, sublayer, norm: str, dropout_rate: float, deterministic: bool, kw,
              epsilon: float):
    """Sublayer i with its residual: Add&Norm after it ('post') or LayerNorm before it ('pre').
    Called inside a block's compact `__call__`, so the norms are that block's submodules."""
    if norm == "post":
        return AddNorm(dropout_rate, epsilon, name=f"addnorm{i}", **kw)(
            x, sublayer(x), deterministic=deterministic)
    y = sublayer(nn.LayerNorm(epsilon, name=f"ln{i}", **kw)(x))
    return x + nn.Dropout(dropout_rate)(y, deterministic=deterministic)


def _check_norm(norm: str):
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: expected one of {NORMS}")


class _Block(nn.Module):
    """The hyperparameters of a Transformer block. `dropout_rate` applies to each sublayer's
    output, `attention_dropout_rate` to the attention weights; `attention_kwargs` go to the
    (self-)attention's `MultiHeadAttention` (attention='local', block_size, look_back, causal,
    rotary, decode)."""

    num_heads: int
    ffn_hiddens: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    norm: str = "post"
    activation: str = "relu"
    norm_epsilon: float = 1e-6  # LayerNorm's (Flax's default; BERT's checkpoints: 1e-12)
    attention_kwargs: Any = ()
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32


class EncoderBlock(_Block):
    """Self-attention and FFN with residuals: [B, L, E] -> [B, L, E]. `segment_ids` and
    `positions` [B, L] of packed rows go to the attention (`MultiHeadAttention`)."""

    @nn.compact
    def __call__(self, x_BxLxE, mask=None, deterministic: bool = True, segment_ids=None,
                 positions=None):
        _check_norm(self.norm)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = MultiHeadAttention(self.num_heads, dropout_rate=self.attention_dropout_rate,
                                       name="attention", **dict(self.attention_kwargs), **kw)
        ffn = PositionwiseFFN(self.ffn_hiddens, activation=self.activation, name="ffn", **kw)
        sublayers = (lambda x: attention(x, mask=mask, segment_ids=segment_ids,
                                         positions=positions, deterministic=deterministic), ffn)
        for i, sublayer in enumerate(sublayers):
            x_BxLxE = _residual(i + 1, x_BxLxE, sublayer, self.norm, self.dropout_rate,
                                deterministic, kw, self.norm_epsilon)
        return x_BxLxE


class _Stack(nn.Module):
    """The hyperparameters and input layer that every Transformer stack shares.

    Token embeddings scaled by sqrt(E) plus a positional encoding ('sinusoidal' or 'learned';
    'rotary' rotates queries and keys inside self-attention instead), then dropout. A
    sequence longer than `max_length` is a clear error. With `decode=True`, `init` on
    [B, max_length] tokens creates the key/value caches; each later call (with 'cache'
    mutable) continues the sequence from where the last one stopped.
    """

    vocab_size: int
    num_layers: int = 2
    d_model: int = 128
    num_heads: int = 4
    ffn_hiddens: int = 512
    max_length: int = 256
    position: str = "sinusoidal"
    attention: str = "full"
    block_size: int = 128
    look_back: int = 0
    look_ahead: int = 0  # blocks after a query's own: encoders only (causal blocks refuse it)
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    norm: str = "pre"
    activation: str = "gelu"
    norm_epsilon: float = 1e-6
    remat: str = "none"
    attention_impl: str = "seqjax"
    decode: bool = False
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.nowrap
    def _kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    @nn.nowrap
    def _block_kwargs(self, causal: bool) -> dict:
        attention_kwargs = dict(attention=self.attention, block_size=self.block_size,
                                look_back=self.look_back, rotary=self.position == "rotary",
                                attention_impl=self.attention_impl)
        if causal:
            attention_kwargs.update(causal=True, decode=self.decode)
        else:
            attention_kwargs.update(look_ahead=self.look_ahead)
        return dict(num_heads=self.num_heads, ffn_hiddens=self.ffn_hiddens,
                    dropout_rate=self.dropout_rate,
                    attention_dropout_rate=self.attention_dropout_rate, norm=self.norm,
                    activation=self.activation, norm_epsilon=self.norm_epsilon,
                    attention_kwargs=tuple(attention_kwargs.items()),
                    **self._kw())

    @nn.nowrap
    def _block(self, block_cls, i: int, *, causal: bool):
        """Block i, rematerialised as `remat` says (not when decoding: no backward pass)."""
        static = (4,) if block_cls is DecoderBlock else (3,)  # `deterministic`
        return compute.remat(block_cls, "none" if self.decode else self.remat, static)(
            **self._block_kwargs(causal=causal), name=f"block{i}")

    @nn.nowrap
    def _embed(self, tokens_BxL, deterministic: bool, positions_BxL=None):
        """Embedded tokens [B, L, E] at their positions: `positions_BxL` (packed rows), else
        0..L-1 offset by the cache when decoding. Called inside the subclass's compact
        `__call__`: the layers are its submodules."""
        if self.position not in position.ENCODINGS:
            raise ValueError(f"position={self.position!r}: expected one of {position.ENCODINGS}")
        _check_norm(self.norm)
        L = tokens_BxL.shape[-1]
        if L > self.max_length:
            raise ValueError(f"sequence of length {L} is longer than the model's max_length "
                             f"{self.max_length}")
        offset = 0
        if self.decode:  # the position of this call's first token in the decoded sequence
            is_initialized = self.has_variable("cache", "position")
            index = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            if is_initialized:
                offset = index.value
                index.value = offset + L
        x = nn.Embed(self.vocab_size, self.d_model, name="embed", **self._kw())(tokens_BxL)
        x = x * jnp.asarray(np.sqrt(self.d_model), x.dtype)
        if self.position == "sinusoidal":
            pe = jnp.asarray(position.sinusoidal_encoding(self.max_length, self.d_model))
            pe = jax.lax.dynamic_slice_in_dim(pe, offset, L) if positions_BxL is None \
                else jnp.take(pe, positions_BxL, axis=0)
            x = x + pe.astype(x.dtype)
        elif self.position == "learned":
            x = position.LearnedPosition(self.max_length, self.param_dtype, name="pos")(
                x, offset, positions_BxL)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)

    @nn.nowrap
    def _head(self, x_BxLxE):
        """Final LayerNorm (pre-norm stacks) and the linear head: logits [B, L, V] in float32."""
        if self.norm == "pre":
            x_BxLxE = nn.LayerNorm(self.norm_epsilon, name="ln_final", **self._kw())(x_BxLxE)
        return nn.Dense(self.vocab_size, name="head", dot_general=compute.float32_dot,
                        **self._kw())(x_BxLxE).astype(jnp.float32)


class TransformerLM(_Stack):
    """Decoder-only Transformer language model: tokens [B, L] -> logits [B, L, V] (float32):
    the input layer of `_Stack`, `num_layers` causal `EncoderBlock`s (full or block-local
    attention), a final LayerNorm for pre-norm stacks, and a linear head."""

    @nn.compact
    def __call__(self, tokens_BxL, *, deterministic: bool = True):
        x = self._embed(tokens_BxL, deterministic)
        for i in range(self.num_layers):
            x = self._block(EncoderBlock, i, causal=True)(x, None, deterministic)
        return self._head(x)


class DecoderBlock(_Block):
    """Causal self-attention, cross-attention to the encoder's output `memory` [B, S, E']
    (queries from the decoder, keys and values from the encoder; `memory_mask` [B, S] marks
    real source tokens), and an FFN, each with its residual: [B, T, E] -> [B, T, E].
    `attention_kwargs` go to the self-attention (attention='local', block_size, look_back,
    rotary, decode); cross-attention is always full attention over the source. Packed rows
    give `segment_ids` and `positions` [B, T] of the target and `memory_segment_ids` [B, S] of
    the source."""

    @nn.compact
    def __call__(self, x_BxTxE, memory_BxSxE, memory_mask_BxS=None, deterministic: bool = True,
                 segment_ids=None, memory_segment_ids=None, positions=None):
        _check_norm(self.norm)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = functools.partial(MultiHeadAttention, self.num_heads,
                                      dropout_rate=self.attention_dropout_rate, **kw)
        attention_kwargs = dict(self.attention_kwargs)
        self_attention = attention(name="self_attention", **{**attention_kwargs, "causal": True})
        cross_attention = attention(
            name="cross_attention",
            attention_impl=attention_kwargs.get("attention_impl", "seqjax"))
        ffn = PositionwiseFFN(self.ffn_hiddens, activation=self.activation, name="ffn", **kw)
        sublayers = (
            lambda x: self_attention(x, segment_ids=segment_ids, positions=positions,
                                     deterministic=deterministic),
            lambda x: cross_attention(x, memory_BxSxE, mask=memory_mask_BxS,
                                      segment_ids=segment_ids,
                                      kv_segment_ids=memory_segment_ids,
                                      deterministic=deterministic),
            ffn)
        for i, sublayer in enumerate(sublayers):
            x_BxTxE = _residual(i + 1, x_BxTxE, sublayer, self.norm, self.dropout_rate,
                                deterministic, kw, self.norm_epsilon)
        return x_BxTxE


class TransformerEncoder(_Stack):
    """Source tokens [B, S] with `valid_len` [B] (or, for packed rows, `segment_ids` and
    `positions` [B, S]) -> memory [B, S, E]: the input layer and `num_layers` `EncoderBlock`s
    whose attention ignores padded positions (full, or block-local for long inputs), with a
    final LayerNorm for pre-norm stacks."""

    norm: str = "post"
    activation: str = "relu"

    @nn.compact
    def __call__(self, tokens_BxS, valid_len_B=None, *, segment_ids=None, positions=None,
                 deterministic: bool = True):
        mask_BxS = None if valid_len_B is None else source_mask(valid_len_B, tokens_BxS.shape[1])
        x = self._embed(tokens_BxS, deterministic, positions)
        for i in range(self.num_layers):
            x = self._block(EncoderBlock, i, causal=False)(x, mask_BxS, deterministic,
                                                           segment_ids, positions)
        if self.norm == "pre":
            x = nn.LayerNorm(self.norm_epsilon, name="ln_final", **self._kw())(x)
        return x


class TransformerDecoder(_Stack):
    """Target tokens [B, T] (teacher forcing: `<bos>` and the target shifted right) and the
    `memory` from `init_state` -> (logits [B, T, V] in float32, memory): the input layer,
    `num_layers` `DecoderBlock`s and the head. With `decode=True` it continues from its
    cache, one or more tokens per call; the memory does not change. Packed rows give
    `segment_ids` and `positions` [B, T] of the target and `memory_segment_ids` [B, S] of the
    source, with a memory whose mask is None."""

    norm: str = "post"
    activation: str = "relu"

    @nn.nowrap
    def init_state(self, memory_BxSxE, src_valid_len_B):
        """The decoder's memory: (encoder output [B, S, E], source mask [B, S])."""
        return memory_BxSxE, source_mask(src_valid_len_B, memory_BxSxE.shape[1])

    @nn.compact
    def __call__(self, tokens_BxT, memory, *, segment_ids=None, memory_segment_ids=None,
                 positions=None, deterministic: bool = True):
        x = self._embed(tokens_BxT, deterministic, positions)
        for i in range(self.num_layers):
            x = self._block(DecoderBlock, i, causal=True)(x, *memory, deterministic, segment_ids,
                                                          memory_segment_ids, positions)
        return self._head(x), memory


def source_mask(valid_len_B, length: int):
    """[B, length] bool: True at the first valid_len positions of each row (real tokens)."""
    return jnp.arange(length)[None, :] < jnp.asarray(valid_len_B)[:, None]


class EncoderDecoder(nn.Module):
    """The encoder-decoder architecture: source [B, S] with valid lengths [B] and target
    [B, T] -> logits [B, T, V].

    `encoder(src_BxS, src_valid_len_B) -> outputs`; `decoder.init_state(outputs,
    src_valid_len_B) -> memory`, a pytree whose leaves have the batch first;
    `decoder(tgt_BxT, memory) -> (logits_BxTxV, memory)`. `encode` and `decode` are separate
    so that a search encodes once and then decodes step by step, the Transformer decoder
    from its key/value cache (`decode=True`, 'cache' mutable), the recurrent one from the
    hidden state it keeps in its memory.
    """

    encoder: nn.Module
    decoder: nn.Module

    def encode(self, src_BxS, src_valid_len_B, *, deterministic: bool = True):
        outputs = self.encoder(src_BxS, src_valid_len_B, deterministic=deterministic)
        return self.decoder.init_state(outputs, src_valid_len_B)

    def decode(self, tgt_BxT, memory, *, deterministic: bool = True):
        return self.decoder(tgt_BxT, memory, deterministic=deterministic)

    def __call__(self, src_BxS, src_valid_len_B, tgt_BxT, *, src_segment_ids=None,
                 src_positions=None, tgt_segment_ids=None, tgt_positions=None,
                 deterministic: bool = True):
        """Teacher-forced logits [B, T, V] (float32). Packed rows (Transformer stacks only)
        give the segment ids and positions of both sides ([B, S] and [B, T]) and no valid
        lengths: target segment s reads source segment s."""
        if src_segment_ids is None:
            memory = self.encode(src_BxS, src_valid_len_B, deterministic=deterministic)
            return self.decode(tgt_BxT, memory, deterministic=deterministic)[0]
        outputs = self.encoder(src_BxS, segment_ids=src_segment_ids, positions=src_positions,
                               deterministic=deterministic)
        return self.decoder(tgt_BxT, (outputs, None), segment_ids=tgt_segment_ids,
                            memory_segment_ids=src_segment_ids, positions=tgt_positions,
                            deterministic=deterministic)[0]
