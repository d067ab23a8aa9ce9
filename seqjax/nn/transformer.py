"""Transformer blocks (Vaswani et al. 2017, the textbook's chapter) and a decoder-only LM.

Dimension letters: B batch, L length, E model dimension (`d_model`), V vocabulary.

`EncoderBlock` is self-attention then a position-wise FFN, each followed by Add&Norm
(residual plus LayerNorm: `norm='post'`, the original) or preceded by LayerNorm
(`norm='pre'`, which trains deep stacks without warm-up tricks). With `causal=True` the same
block is a decoder-only (GPT-style) block.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.nn import position
from seqjax.nn.attention import MultiHeadAttention

Dtype = Any
NORMS = ("post", "pre")


class PositionwiseFFN(nn.Module):
    """The same two-layer MLP at every position: Dense(ffn_hiddens) -> ReLU/GELU -> Dense."""

    ffn_hiddens: int
    out_features: Optional[int] = None
    activation: str = "relu"
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxE):
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = dense(self.ffn_hiddens, name="dense1")(x_BxLxE)
        hidden = {"relu": nn.relu, "gelu": nn.gelu}[self.activation](hidden)
        return dense(self.out_features or x_BxLxE.shape[-1], name="dense2")(hidden)


class AddNorm(nn.Module):
    """LayerNorm(dropout(Y) + X): the residual connection and layer normalisation."""

    dropout_rate: float = 0.0
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, y, *, deterministic: bool = True):
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln")(x + y)


class EncoderBlock(nn.Module):
    """Self-attention and FFN with residuals: [B, L, E] -> [B, L, E]. `dropout_rate` applies
    to each sublayer's output (and embeddings), `attention_dropout_rate` to the attention
    weights. `attention_kwargs` go to `MultiHeadAttention` (attention='local', block_size,
    look_back, causal, rotary, decode)."""

    num_heads: int
    ffn_hiddens: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    norm: str = "post"
    activation: str = "relu"
    attention_kwargs: Any = ()
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxE, mask=None, *, deterministic: bool = True):
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}: expected one of {NORMS}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = MultiHeadAttention(self.num_heads, dropout_rate=self.attention_dropout_rate,
                                       name="attention", **dict(self.attention_kwargs), **kw)
        ffn = PositionwiseFFN(self.ffn_hiddens, activation=self.activation, name="ffn", **kw)
        sublayers = (lambda x: attention(x, mask=mask, deterministic=deterministic), ffn)
        for i, sublayer in enumerate(sublayers):
            if self.norm == "post":
                x_BxLxE = AddNorm(self.dropout_rate, name=f"addnorm{i + 1}", **kw)(
                    x_BxLxE, sublayer(x_BxLxE), deterministic=deterministic)
            else:
                y = sublayer(nn.LayerNorm(name=f"ln{i + 1}", **kw)(x_BxLxE))
                x_BxLxE = x_BxLxE + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        return x_BxLxE


class TransformerLM(nn.Module):
    """Decoder-only Transformer language model: tokens [B, L] -> logits [B, L, V] (float32).

    Token embeddings scaled by sqrt(E) plus a positional encoding ('sinusoidal' or 'learned';
    'rotary' rotates queries and keys inside attention instead), dropout, `num_layers` causal
    `EncoderBlock`s (full or block-local attention), a final LayerNorm for pre-norm stacks,
    and a linear head. A sequence longer than `max_length` is a clear error.

    With `decode=True`, `init` on [B, max_length] tokens creates the key/value caches; each
    later call (with 'cache' mutable) continues the sequence from where the last one stopped.
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
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    norm: str = "pre"
    activation: str = "gelu"
    decode: bool = False
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens_BxL, *, deterministic: bool = True):
        if self.position not in position.ENCODINGS:
            raise ValueError(f"position={self.position!r}: expected one of {position.ENCODINGS}")
        L = tokens_BxL.shape[-1]
        if L > self.max_length:
            raise ValueError(f"sequence of length {L} is longer than the model's max_length "
                             f"{self.max_length}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        offset = 0
        if self.decode:  # the position of this call's first token in the decoded sequence
            is_initialized = self.has_variable("cache", "position")
            index = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            if is_initialized:
                offset = index.value
                index.value = offset + L

        x = nn.Embed(self.vocab_size, self.d_model, name="embed", **kw)(tokens_BxL)
        x = x * jnp.asarray(np.sqrt(self.d_model), x.dtype)
        if self.position == "sinusoidal":
            pe = jnp.asarray(position.sinusoidal_encoding(self.max_length, self.d_model))
            x = x + jax.lax.dynamic_slice_in_dim(pe, offset, L).astype(x.dtype)
        elif self.position == "learned":
            x = position.LearnedPosition(self.max_length, self.param_dtype, name="pos")(x, offset)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)

        attention_kwargs = dict(attention=self.attention, block_size=self.block_size,
                                look_back=self.look_back, causal=True,
                                rotary=self.position == "rotary", decode=self.decode)
        for i in range(self.num_layers):
            x = EncoderBlock(self.num_heads, self.ffn_hiddens, self.dropout_rate,
                             attention_dropout_rate=self.attention_dropout_rate, norm=self.norm,
                             activation=self.activation,
                             attention_kwargs=tuple(attention_kwargs.items()),
                             name=f"block{i}", **kw)(x, deterministic=deterministic)
        if self.norm == "pre":
            x = nn.LayerNorm(name="ln_final", **kw)(x)
        return nn.Dense(self.vocab_size, name="head", **kw)(x).astype(jnp.float32)
