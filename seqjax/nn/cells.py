"""Recurrent cells (RNN, GRU, LSTM) as pure functions of fused weights, for `Recurrent`.

Dimension letters: B batch (any number of leading axes), T time, F input features,
H hidden features (a cell's `features`), G the fused gate axis (number of gates x H).

The parameter tree keeps one matrix per textbook equation (`W_xi`, `W_hi`, `b_i`, ...), so a
checkpoint reads like the book and weights can be copied from another library. The cells
compute with them fused: `weights()` concatenates the per-gate kernels along the output axis
into one W_x_FxG and one W_h_HxG, `project_inputs` applies W_x_FxG (and the biases) to every
time step at once, and `step` does only the recurrent product, hp = h @ W_h_HxG, once per time
step, then the elementwise `gates` (the textbook GRU has a second product, (r*h) @ W_hh, which
needs the gates first, so its `gates` does it).

Initialisers: input kernels default to LeCun normal (Flax's default for Dense and its cells).
It depends only on fan-in, so a per-gate (F, H) matrix gets the same distribution as the
fused (F, G) one would; Glorot would change with the layout. Recurrent kernels default to
orthogonal, per gate, which keeps h @ W_hh norm-preserving at initialisation.

Dtypes: parameters are stored in `param_dtype`; matmuls and gate nonlinearities run in
`dtype` (e.g. bfloat16). The carry keeps the dtype it was created in (`param_dtype` by
default, so float32), so the LSTM cell state and the GRU interpolation accumulate in full
precision over long sequences; the outputs y come back in the computation dtype.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]


def _cat(arrays):
    return jnp.concatenate(arrays, axis=-1)


class _Cell(nn.Module):
    """Fields and plumbing shared by the cells. Each cell has three parts, which `Recurrent`
    calls separately: `weights(F)` (the only method touching Flax variables) returns the fused
    arrays w, `project_inputs(w, x)` is the input half of every gate, and `step(w, carry, xp)`
    is a pure function of arrays for one time step. `__call__(carry, x_BxF)` chains the three.

    `step` is itself two parts, so that `Recurrent` can differentiate the recurrent product
    by hand: hp = recurrent_input(carry) @ W_h, then `gates(w, carry, xp, hp)`, which reads no
    W_x, W_h or b from w and, except in the textbook GRU, is elementwise."""

    features: int
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    recurrent_init: Initializer = nn.initializers.orthogonal()
    bias_init: Initializer = nn.initializers.zeros_init()
    # Whether `gates` reads xp and hp only through xp + hp, so that their cotangents are equal
    # and the backward scan of `fused_weight_grad` stores one of them (not a dataclass field).
    gates_see_sum = False

    @nn.nowrap
    def _gate_params(self, in_features: int, gates: str):
        """Creates (at init) or fetches W_x{g} (F, H), W_h{g} (H, H), b_{g} (H,) for each gate g.
        Called only from a cell's compact `weights`."""
        H, pdt = self.features, self.param_dtype
        first = f"W_x{gates[0]}"  # at apply: are the inputs as wide as the parameters expect?
        if self.has_variable("params", first):
            shape = tuple(self.get_variable("params", first).shape)
            if shape[0] != in_features:
                raise ValueError(
                    f"{type(self).__name__} at '{self.scope.path_text}': the inputs have "
                    f"{in_features} features, but its parameter {first} has shape {shape}, "
                    f"made for inputs of {shape[0]} features")
        W_x = [self.param(f"W_x{g}", self.kernel_init, (in_features, H), pdt) for g in gates]
        W_h = [self.param(f"W_h{g}", self.recurrent_init, (H, H), pdt) for g in gates]
        b = [self.param(f"b_{g}", self._bias_init(g), (H,), pdt) for g in gates]
        return W_x, W_h, b

    @nn.nowrap
    def _bias_init(self, gate: str) -> Initializer:
        return self.bias_init

    @nn.nowrap
    def _cast(self, w: dict) -> dict:
        return w if self.dtype is None else jax.tree.map(lambda a: a.astype(self.dtype), w)

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        """Zeros for inputs of shape (*batch, in_features); `rng` is unused (Flax's signature)."""
        return jnp.zeros(tuple(input_shape[:-1]) + (self.features,), self.param_dtype)

    @nn.nowrap
    def project_inputs(self, w: dict, x_BxTxF: jax.Array) -> jax.Array:
        """x @ [W_x* for each gate] + [b_* for each gate], for any number of leading axes."""
        x, W_x_FxG, b_G = nn.dtypes.promote_dtype(x_BxTxF, w["W_x"], w["b"], dtype=self.dtype)
        return x @ W_x_FxG + b_G

    @nn.nowrap
    def recurrent_input(self, carry):
        """What multiplies W_h: the hidden state h, which is the whole carry but the LSTM's."""
        return carry

    @property
    def gates_are_elementwise(self) -> bool:
        """Whether W_h is the step's only matmul, i.e. `gates` is elementwise."""
        return True

    @nn.nowrap
    def step(self, w, carry, xp_BxG):
        """One step given the projected input xp = x W_x + b; pure, so it can run in a scan."""
        hp_BxG = self.recurrent_input(carry).astype(xp_BxG.dtype) @ w["W_h"]
        return self.gates(w, carry, xp_BxG, hp_BxG)

    def __call__(self, carry, x_BxF):
        """One time step: (carry, x_BxF) -> (new_carry, y_BxH)."""
        w = self.weights(x_BxF.shape[-1])
        return self.step(w, carry, self.project_inputs(w, x_BxF))


class RNNCell(_Cell):
    """Elman RNN: h' = tanh(x W_xh + h W_hh + b_h); the carry is h and y = h'."""

    gates_see_sum = True

    @nn.compact
    def weights(self, in_features: int) -> dict:
        """The textbook parameters (created at init), fused for computation and cast to `dtype`:
        W_x (F, G), W_h (H, G), b (G,) with the gates in the order of the equations."""
        (W_xh,), (W_hh,), (b_h,) = self._gate_params(in_features, "h")
        return self._cast({"W_x": W_xh, "W_h": W_hh, "b": b_h})

    @nn.nowrap
    def gates(self, w, h_BxH, xp_BxH, hp_BxH):
        """(new carry, y) given xp = x W_xh + b_h and hp = h W_hh."""
        h_new = jnp.tanh(xp_BxH + hp_BxH)
        return h_new.astype(h_BxH.dtype), h_new


class GRUCell(_Cell):
    """Gated recurrent unit (Cho et al. 2014), h' = z*h + (1-z)*h~ with
        r = sigmoid(x W_xr + h W_hr + b_r),  z = sigmoid(x W_xz + h W_hz + b_z).

    `reset_after=False` (textbook, Dive into Deep Learning 10.2):
        h~ = tanh(x W_xh + (r*h) W_hh + b_h)
    needs two recurrent matmuls per step: [W_hr|W_hz] fused, then (r*h) W_hh.
    `reset_after=True` (the Flax/PyTorch/cuDNN form):
        h~ = tanh(x W_xh + b_h + r*(h W_hh + b_hh))
    fuses all three recurrent products into one matmul. It has one extra parameter, `b_hh`
    (H,): the bias of the recurrent product h W_hh, which sits inside r*(...) and so, unlike
    the biases of r and z, cannot be folded into b_h.

    Copying weights from other libraries (tests check the Flax mapping):
    - flax.linen.GRUCell (Dense layers ir, iz, in with bias; hr, hz without; hn with bias):
      W_x{r,z,h} = {ir,iz,in}.kernel, W_h{r,z,h} = {hr,hz,hn}.kernel,
      b_{r,z,h} = {ir,iz,in}.bias, b_hh = hn.bias.
    - torch.nn.GRU (gate rows r, z, n): W_x* = W_ih.T blocks, W_h* = W_hh.T blocks,
      b_r = b_ir + b_hr, b_z = b_iz + b_hz, b_h = b_in, b_hh = b_hn.
    All three use h' = z*h + (1-z)*h~ as here.
    """

    reset_after: bool = False

    @nn.compact
    def weights(self, in_features: int) -> dict:
        W_x, (W_hr, W_hz, W_hh), b = self._gate_params(in_features, "rzh")
        w = {"W_x": _cat(W_x), "b": _cat(b)}
        if self.reset_after:
            w["W_h"] = _cat([W_hr, W_hz, W_hh])
            w["b_hh"] = self.param("b_hh", self.bias_init, (self.features,), self.param_dtype)
        else:
            w["W_h"], w["W_hh"] = _cat([W_hr, W_hz]), W_hh
        return self._cast(w)

    @property
    def gates_are_elementwise(self) -> bool:
        return self.reset_after

    @nn.nowrap
    def gates(self, w, h_BxH, xp_BxG, hp_BxG):
        """(new carry, y) given xp = x [W_xr|W_xz|W_xh] + b and hp = h W_h: [W_hr|W_hz|W_hh]
        with `reset_after`, else [W_hr|W_hz], and the candidate's (r*h) W_hh done here."""
        H = self.features
        r, z = jnp.split(jax.nn.sigmoid(xp_BxG[..., :2 * H] + hp_BxG[..., :2 * H]), 2, axis=-1)
        if self.reset_after:
            cand = jnp.tanh(xp_BxG[..., 2 * H:] + r * (hp_BxG[..., 2 * H:] + w["b_hh"]))
        else:
            cand = jnp.tanh(xp_BxG[..., 2 * H:] + (r * h_BxH.astype(xp_BxG.dtype)) @ w["W_hh"])
        h_new = z * h_BxH + (1 - z) * cand  # mixed in the carry's dtype
        return h_new.astype(h_BxH.dtype), h_new.astype(xp_BxG.dtype)


class LSTMCell(_Cell):
    """Long short-term memory (Hochreiter & Schmidhuber 1997; D2L 10.1), carry (c, h):
        i, f, o = sigmoid(x W_x* + h W_h* + b_*),  c~ = tanh(x W_xc + h W_hc + b_c),
        c' = f*c + i*c~,  h' = o*tanh(c'),  y = h'.
    `forget_bias` is added to the initial b_f (1.0 is the usual choice, Jozefowicz et al. 2015;
    Keras's unit_forget_bias=True; Flax and PyTorch add nothing, as the default 0.0 here).

    Conventions shared with flax.linen.LSTMCell: the carry is (c, h), y = h', and the gates
    have the same equations; Flax calls the candidate c~ "g". Copying weights from it
    (Dense layers ii, if, ig, io without bias; hi, hf, hg, ho with bias):
    W_x{i,f,o,c} = {ii,if,io,ig}.kernel, W_h{i,f,o,c} = {hi,hf,ho,hg}.kernel,
    b_{i,f,o,c} = {hi,hf,ho,hg}.bias. From torch.nn.LSTM (gate rows i, f, g, o; carry (h, c)):
    W_x* = W_ih.T blocks, W_h* = W_hh.T blocks, b_* = b_i* + b_h*.
    """

    forget_bias: float = 0.0
    gates_see_sum = True

    @nn.nowrap
    def _bias_init(self, gate: str) -> Initializer:
        if gate != "f" or not self.forget_bias:
            return self.bias_init
        return lambda key, shape, dtype: self.bias_init(key, shape, dtype) + jnp.asarray(
            self.forget_bias, dtype)

    @nn.compact
    def weights(self, in_features: int) -> dict:
        W_x, W_h, b = self._gate_params(in_features, "ifoc")
        return self._cast({"W_x": _cat(W_x), "W_h": _cat(W_h), "b": _cat(b)})

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        """(c, h) zeros for inputs of shape (*batch, in_features)."""
        zeros = super().initialize_carry(rng, input_shape)
        return zeros, zeros

    @nn.nowrap
    def recurrent_input(self, carry):
        return carry[1]  # h of (c, h)

    @nn.nowrap
    def gates(self, w, carry, xp_BxG, hp_BxG):
        """(new carry, y) given xp = x W_x + b and hp = h W_h, both [i|f|o|c]."""
        c, h = carry
        H = self.features
        pre_BxG = xp_BxG + hp_BxG
        i, f, o = jnp.split(jax.nn.sigmoid(pre_BxG[..., :3 * H]), 3, axis=-1)
        c_new = f * c + i * jnp.tanh(pre_BxG[..., 3 * H:])  # in the carry's dtype
        h_new = o * jnp.tanh(c_new)
        return (c_new.astype(c.dtype), h_new.astype(h.dtype)), h_new.astype(xp_BxG.dtype)


CELLS = {"rnn": RNNCell, "gru": GRUCell, "lstm": LSTMCell}
