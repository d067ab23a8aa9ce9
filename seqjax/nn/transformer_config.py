"""The hyperparameters of a Transformer stack (LM, encoder, decoder, BERT encoder) as one frozen
dataclass, checked in one place: tasks build it from a config (errors name config keys), and
`kwargs()` gives it to a stack module of `seqjax.nn.transformer`."""

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

from seqjax.nn import compute, position
from seqjax.nn.attention import ATTENTION_IMPLS, ATTENTION_KINDS, cudnn_runs

Dtype = Any
NORMS = ("post", "pre")
ACTIVATIONS = ("relu", "gelu", "gelu_exact")  # gelu: the tanh approximation; exact: erf


def _raise(ok: bool, name: str, value, what: str):
    if not ok:
        raise ValueError(f"{name}={value!r}: {what}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The hyperparameters of a Transformer stack (LM, encoder, decoder, BERT encoder), checked
    in one place; `kwargs()` gives them to a module. `dropout_rate` applies to each sublayer's
    output, `attention_dropout_rate` to the attention weights."""

    num_layers: int
    d_model: int
    num_heads: int
    ffn_hiddens: int
    max_length: int
    position: str
    attention: str
    block_size: int
    look_back: int
    look_ahead: int  # non-causal (encoder) self-attention only; causal stacks use 0
    dropout_rate: float
    attention_dropout_rate: float
    norm: str
    norm_epsilon: float
    activation: str
    remat: str
    attention_impl: str
    dtype: Optional[Dtype]
    param_dtype: Dtype

    def check(self, name=lambda field: field, expect=_raise) -> "TransformerConfig":
        """Calls `expect(ok, name(field), value, what)` for every rule (the default raises a
        ValueError '{field}={value}: {what}'); `name` maps a field to the name a user knows it
        by (a config key). Returns self."""
        def positive_int(field):
            value = getattr(self, field)
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            expect(ok, name(field), value, "must be a positive integer")

        def fraction(field):
            value = getattr(self, field)
            expect(isinstance(value, (int, float)) and 0 <= value < 1, name(field), value,
                   "must be in [0, 1)")

        def one_of(field, choices):
            value = getattr(self, field)
            expect(value in choices, name(field), value, f"expected one of {choices}")

        for field in ("num_layers", "d_model", "num_heads", "ffn_hiddens", "max_length",
                      "block_size"):
            positive_int(field)
        fraction("dropout_rate")
        fraction("attention_dropout_rate")
        for field in ("look_back", "look_ahead"):
            value = getattr(self, field)
            expect(isinstance(value, int) and value >= 0, name(field), value, "must be >= 0")
        expect(self.d_model % self.num_heads == 0, name("d_model"), self.d_model,
               f"must be divisible by {name('num_heads')}={self.num_heads}")
        one_of("attention", ATTENTION_KINDS)
        one_of("position", position.ENCODINGS)
        expect(self.position != "rotary" or (self.d_model // self.num_heads) % 2 == 0,
               name("position"), self.position, "rotary needs an even head dimension")
        one_of("norm", NORMS)
        one_of("activation", ACTIVATIONS)
        expect(isinstance(self.norm_epsilon, float) and 0 < self.norm_epsilon < 1,
               name("norm_epsilon"), self.norm_epsilon, "must be a float in (0, 1)")
        one_of("remat", compute.REMAT)
        one_of("attention_impl", ATTENTION_IMPLS)
        expect(self.attention_impl not in ("xla", "cudnn") or self.attention_dropout_rate == 0,
               name("attention_impl"), self.attention_impl,
               f"has no dropout on the attention weights: set {name('attention_dropout_rate')} "
               f"to 0, or use 'seqjax' or 'auto'")
        expect(self.attention_impl != "cudnn"
               or cudnn_runs(self.dtype or jnp.float32, self.d_model // self.num_heads),
               name("attention_impl"), self.attention_impl,
               "needs an NVIDIA GPU, bfloat16 computation and a head dimension (d_model / "
               "num_heads) that is a multiple of 8 and at most 128; 'auto' uses cuDNN where it "
               "runs")
        return self

    def kwargs(self, *exclude: str) -> dict:
        """The fields as keyword arguments of a stack module, less `exclude`."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in exclude}
