"""Positional information: sinusoidal encodings, learned embeddings, rotary embeddings.

Dimension letters: B batch, L length, E model dimension, H heads, D head dimension.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ENCODINGS = ("sinusoidal", "learned", "rotary")


def sinusoidal_encoding(length: int, dim: int, base: float = 10000.0) -> np.ndarray:
    """[length, dim] float32 with PE(pos, 2i) = sin(pos / base^(2i/dim)) and
    PE(pos, 2i+1) = cos(pos / base^(2i/dim)) (Vaswani et al. 2017, the textbook's form)."""
    if length < 0 or dim <= 0:
        raise ValueError(f"sinusoidal_encoding(length={length}, dim={dim}): need length >= 0 "
                         f"and dim > 0")
    angle_LxI = np.arange(length)[:, None] / base ** (np.arange(0, dim, 2) / dim)[None, :]
    pe = np.zeros((length, dim), np.float64)
    pe[:, 0::2] = np.sin(angle_LxI)
    pe[:, 1::2] = np.cos(angle_LxI[:, :dim // 2])
    return pe.astype(np.float32)


class LearnedPosition(nn.Module):
    """A learned embedding P [max_length, E] added to inputs [B, L, E] at positions
    offset..offset+L-1, or at `positions` [B, L] when given (packed rows, whose positions
    restart with each sequence, all below L); a sequence longer than `max_length` is a clear
    error. A traced `offset` (cached decoding) cannot be checked: past the table, rows are
    clamped, so decoders check the total length before they start (as `charlm_transformer`
    does)."""

    max_length: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxE, offset=0, positions=None):
        L = x_BxLxE.shape[-2]
        if L > self.max_length:
            raise ValueError(f"sequence of length {L} is longer than the model's max_length "
                             f"{self.max_length}")
        P = self.param("P", nn.initializers.normal(0.02), (self.max_length, x_BxLxE.shape[-1]),
                       self.param_dtype)
        if positions is not None:
            return x_BxLxE + jnp.take(P, positions, axis=0).astype(x_BxLxE.dtype)
        return x_BxLxE + jax.lax.dynamic_slice_in_dim(P, offset, L).astype(x_BxLxE.dtype)


def rotary(x_BxLxHxD, positions, base: float = 10000.0):
    """Rotary position embedding (Su et al. 2021, RoFormer), in the half-split layout of
    GPT-NeoX and LLaMA: feature pairs (i, i + D/2) of each head are rotated by the angle
    position / base^(2i/D). The dot product of a rotated query at m and a rotated key at n
    then depends on m - n only. `positions` is [L], or [B, L] (packed rows)."""
    D = x_BxLxHxD.shape[-1]
    if D % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {D}")
    inv_freq = 1.0 / base ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D)
    angle_x1xD2 = jnp.asarray(positions, jnp.float32)[..., None, None] * inv_freq
    cos, sin = jnp.cos(angle_x1xD2), jnp.sin(angle_x1xD2)
    x1, x2 = jnp.split(x_BxLxHxD.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxHxD.dtype)
