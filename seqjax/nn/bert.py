"""BERT (Devlin et al. 2019; the textbook's chapter on pretraining): a Transformer encoder over
token, segment and learned position embeddings, with the heads of its pretraining tasks
(masked language modelling, next-sentence prediction) and a sequence classifier for
fine-tuning.

Packed rows (pretraining only): several sequences a row, told apart by `pack_ids` [B, L] (0 at
padding, 1..k for the row's sequences; not BERT's token-type `segments`, which say A or B
within a sequence) with `position_ids` [B, L] that restart at 0 with each sequence. Attention
stays within a packed sequence, and the pooler and NSP head run on each one's [CLS]
(`cls_positions` [B, M]).

Dimension letters: B batch, L length, P predicted positions, E model dimension (`d_model`),
V vocabulary, C classes, M packed sequences a row.

Parameter tree: `encoder` (the part that fine-tuning loads from a pretraining checkpoint),
`pooler` (tanh Dense on [CLS]), and the heads: `mlm_head` (Dense, GELU, LayerNorm, then the
transposed token embedding, so the output projection shares the embedding array, plus a
bias), `nsp_head`, `classifier`.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn import compute
from seqjax.nn.position import LearnedPosition
from seqjax.nn.transformer import ACTIVATION_FNS, EncoderBlock, _check_norm

Dtype = Any
_normal = nn.initializers.normal(0.02)  # BERT's initialiser of embeddings

# The published BERT shapes (Turc et al. 2019, "Well-Read Students Learn Better"):
# layers, d_model, heads; the FFN is 4 * d_model wide.
BERT_SIZES = {"tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8),
              "medium": (8, 512, 8), "base": (12, 768, 12)}


class BertEncoder(nn.Module):
    """tokens [B, L] (and segment ids [B, L], a padding mask [B, L]: True at real tokens) ->
    [B, L, E]: the sum of token, segment and position embeddings, LayerNorm and dropout, then
    `num_layers` `EncoderBlock`s with GELU, post-norm as in BERT (`norm='pre'`: LayerNorm
    before each sublayer and once at the end). The released checkpoints use the exact (erf)
    GELU (`activation='gelu_exact'`) and LayerNorm epsilon 1e-12. `attention='local'` attends
    within blocks of `block_size`, `look_back` blocks before and `look_ahead` after, at
    O(L * block_size) cost.
    A sequence longer than `max_length` (the position table) is a clear error. `remat` and
    `attention_impl` as in `seqjax.nn.transformer`."""

    vocab_size: int
    num_layers: int = 2
    d_model: int = 128
    num_heads: int = 2
    ffn_hiddens: int = 512
    max_length: int = 512
    num_segments: int = 2
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    norm: str = "post"
    activation: str = "gelu"
    norm_epsilon: float = 1e-6
    attention: str = "full"
    block_size: int = 128
    look_back: int = 0
    look_ahead: int = 0
    remat: str = "none"
    attention_impl: str = "seqjax"
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def setup(self):
        _check_norm(self.norm)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = functools.partial(nn.Embed, features=self.d_model, embedding_init=_normal, **kw)
        self.token_embed = embed(self.vocab_size)
        self.segment_embed = embed(self.num_segments)
        self.position = LearnedPosition(self.max_length, self.param_dtype)
        self.embed_ln = nn.LayerNorm(self.norm_epsilon, **kw)
        self.embed_dropout = nn.Dropout(self.dropout_rate)
        attention_kwargs = (("attention", self.attention), ("block_size", self.block_size),
                            ("look_back", self.look_back), ("look_ahead", self.look_ahead),
                            ("attention_impl", self.attention_impl))
        block = compute.remat(EncoderBlock, self.remat, static_argnums=(3,))
        self.blocks = [block(self.num_heads, self.ffn_hiddens, self.dropout_rate,
                                    self.attention_dropout_rate, norm=self.norm,
                             activation=self.activation, norm_epsilon=self.norm_epsilon,
                             attention_kwargs=attention_kwargs, **kw)
                       for _ in range(self.num_layers)]
        if self.norm == "pre":
            self.ln_final = nn.LayerNorm(self.norm_epsilon, **kw)

    def __call__(self, tokens_BxL, segments_BxL=None, mask_BxL=None, *, pack_ids_BxL=None,
                 position_ids_BxL=None, deterministic: bool = True):
        """Packed rows give `pack_ids_BxL` and `position_ids_BxL` (see the module docstring)
        and need no `mask_BxL`: padding is pack id 0."""
        if segments_BxL is None:
            segments_BxL = jnp.zeros_like(tokens_BxL)
        x = self.token_embed(tokens_BxL) + self.segment_embed(segments_BxL)
        x = self.position(x, positions=position_ids_BxL)
        x = self.embed_dropout(self.embed_ln(x), deterministic=deterministic)
        for block in self.blocks:
            x = block(x, mask_BxL, deterministic, pack_ids_BxL)
        return self.ln_final(x) if self.norm == "pre" else x

    def embedding(self):
        """The token embedding matrix [V, E], for heads tied to it."""
        return self.token_embed.embedding


class Pooler(nn.Module):
    """tanh(Dense(E)) of the [CLS] position: [B, L, E] -> [B, E]; of each packed sequence's
    [CLS] at `cls_positions_BxM`: [B, M, E]."""

    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxE, cls_positions_BxM=None):
        dense = nn.Dense(x_BxLxE.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype)
        cls = x_BxLxE[:, 0] if cls_positions_BxM is None else jnp.take_along_axis(
            x_BxLxE, cls_positions_BxM[..., None], 1)
        return jnp.tanh(dense(cls))


class MLMHead(nn.Module):
    """[B, P, E] -> logits [B, P, V] (float32): Dense(E), the encoder's activation, LayerNorm,
    then the product with the transposed token `embedding` [V, E] (the encoder's own array)
    plus a bias."""

    activation: str = "gelu"
    norm_epsilon: float = 1e-6
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxPxE, embedding_VxE):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(x_BxPxE.shape[-1], name="transform", **kw)(x_BxPxE)
        x = nn.LayerNorm(self.norm_epsilon, name="ln", **kw)(ACTIVATION_FNS[self.activation](x))
        bias = self.param("bias", nn.initializers.zeros, (embedding_VxE.shape[0],),
                          self.param_dtype)
        logits = jnp.einsum("bpe,ve->bpv", x, embedding_VxE.astype(x.dtype),
                            preferred_element_type=jnp.float32)
        return logits + bias


class BertPretraining(nn.Module):
    """The encoder with the MLM head (on `positions` [B, P] when given: the chosen positions
    only, so the V-wide projection runs on P, not L, positions) and, with `nsp`, the pooler and
    the next-sentence head. Returns (mlm_logits [B, P or L, V], nsp_logits [B, 2] or None).
    Packed rows give `pack_ids_BxL`, `position_ids_BxL` and `cls_positions_BxM`, and get
    nsp_logits [B, M, 2], one pair per packed sequence."""

    encoder: BertEncoder
    nsp: bool = True

    @nn.compact
    def __call__(self, tokens_BxL, segments_BxL=None, mask_BxL=None, positions_BxP=None, *,
                 pack_ids_BxL=None, position_ids_BxL=None, cls_positions_BxM=None,
                 deterministic: bool = True):
        kw = dict(dtype=self.encoder.dtype, param_dtype=self.encoder.param_dtype)
        x = self.encoder(tokens_BxL, segments_BxL, mask_BxL, pack_ids_BxL=pack_ids_BxL,
                         position_ids_BxL=position_ids_BxL, deterministic=deterministic)
        h = x if positions_BxP is None else jnp.take_along_axis(x, positions_BxP[..., None], 1)
        mlm_logits = MLMHead(self.encoder.activation, self.encoder.norm_epsilon, name="mlm_head",
                             **kw)(h, self.encoder.embedding())
        nsp_logits = None
        if self.nsp:
            pooled = Pooler(name="pooler", **kw)(x, cls_positions_BxM)
            nsp_logits = nn.Dense(2, name="nsp_head", dot_general=compute.float32_dot,
                                  **kw)(pooled).astype(jnp.float32)
        return mlm_logits, nsp_logits


class BertClassifier(nn.Module):
    """The encoder, the pooler, dropout and a Dense classifier: logits [B, C] (float32). With
    `frozen_encoder`, a linear probe: the encoder and pooler run without dropout and pass no
    gradient back (the optimizer must leave their parameters as they are too), so their output
    can be computed once: `features=True` returns the pooled output [B, D], and `pooled_BxD`
    given in place of the tokens runs only dropout and the classifier on it."""

    encoder: BertEncoder
    num_classes: int = 2
    dropout_rate: float = 0.1
    frozen_encoder: bool = False

    @nn.compact
    def __call__(self, tokens_BxL=None, segments_BxL=None, mask_BxL=None, *, pooled_BxD=None,
                 features: bool = False, deterministic: bool = True):
        kw = dict(dtype=self.encoder.dtype, param_dtype=self.encoder.param_dtype)
        if features and pooled_BxD is not None:
            raise ValueError("features=True returns the pooled output: give tokens, not it")
        if pooled_BxD is None:
            fixed = deterministic or self.frozen_encoder
            x = self.encoder(tokens_BxL, segments_BxL, mask_BxL, deterministic=fixed)
            pooled_BxD = Pooler(name="pooler", **kw)(x)
            if features:
                return pooled_BxD
        if self.frozen_encoder:
            pooled_BxD = jax.lax.stop_gradient(pooled_BxD)
        pooled = nn.Dropout(self.dropout_rate)(pooled_BxD, deterministic=deterministic)
        return nn.Dense(self.num_classes, name="classifier", dot_general=compute.float32_dot,
                        **kw)(pooled).astype(jnp.float32)
