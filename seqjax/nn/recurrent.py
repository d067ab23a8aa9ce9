"""Recurrent cells (RNN, GRU, LSTM), a scan over time, bidirectional and stacked layers.

Dimension letters: B batch (any number of leading axes), T time, F input features,
H hidden features (a cell's `features`), G the fused gate axis (number of gates x H).

The parameter tree keeps one matrix per textbook equation (`W_xi`, `W_hi`, `b_i`, ...), so a
checkpoint reads like the book and weights can be copied from another library. The cells
compute with them fused: `weights()` concatenates the per-gate kernels along the output axis
into one W_x_FxG and one W_h_HxG, `project_inputs` applies W_x_FxG (and the biases) to every
time step at once, and `step` does only the recurrent product, h @ W_h_HxG, once per time step
(twice for the textbook GRU, whose candidate multiplies r*h, which needs the gates first).
`Recurrent` projects the whole sequence with one [T*B, F] @ [F, G] matmul and then runs
`jax.lax.scan` over the pure `step`, with the parameters fetched once outside the loop.

Initialisers: input kernels default to LeCun normal (Flax's default for Dense and its cells).
It depends only on fan-in, so a per-gate (F, H) matrix gets the same distribution as the
fused (F, G) one would; Glorot would change with the layout. Recurrent kernels default to
orthogonal, per gate, which keeps h @ W_hh norm-preserving at initialisation.

Dtypes: parameters are stored in `param_dtype`; matmuls and gate nonlinearities run in
`dtype` (e.g. bfloat16). The carry keeps the dtype it was created in (`param_dtype` by
default, so float32), so the LSTM cell state and the GRU interpolation accumulate in full
precision over long sequences; the outputs y come back in the computation dtype.
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]


def _cat(arrays):
    return jnp.concatenate(arrays, axis=-1)


class _Cell(nn.Module):
    """Fields and plumbing shared by the cells. Each cell has three parts, which `Recurrent`
    calls separately: `weights(F)` (the only method touching Flax variables) returns the fused
    arrays w, `project_inputs(w, x)` is the input half of every gate, and `step(w, carry, xp)`
    is a pure function of arrays for one time step. `__call__(carry, x_BxF)` chains the three."""

    features: int
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    recurrent_init: Initializer = nn.initializers.orthogonal()
    bias_init: Initializer = nn.initializers.zeros_init()

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

    def __call__(self, carry, x_BxF):
        """One time step: (carry, x_BxF) -> (new_carry, y_BxH)."""
        w = self.weights(x_BxF.shape[-1])
        return self.step(w, carry, self.project_inputs(w, x_BxF))


class RNNCell(_Cell):
    """Elman RNN: h' = tanh(x W_xh + h W_hh + b_h); the carry is h and y = h'."""

    @nn.compact
    def weights(self, in_features: int) -> dict:
        """The textbook parameters (created at init), fused for computation and cast to `dtype`:
        W_x (F, G), W_h (H, G), b (G,) with the gates in the order of the equations."""
        (W_xh,), (W_hh,), (b_h,) = self._gate_params(in_features, "h")
        return self._cast({"W_x": W_xh, "W_h": W_hh, "b": b_h})

    @nn.nowrap
    def step(self, w, h_BxH, xp_BxH):
        """One step given the projected input xp = x W_xh + b_h; pure, so it can run in a scan."""
        h_new = jnp.tanh(xp_BxH + h_BxH.astype(xp_BxH.dtype) @ w["W_h"])
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

    @nn.nowrap
    def step(self, w, h_BxH, xp_BxG):
        H = self.features
        h = h_BxH.astype(xp_BxG.dtype)
        if self.reset_after:
            hp_BxG = h @ w["W_h"]
            r, z = jnp.split(jax.nn.sigmoid(xp_BxG[..., :2 * H] + hp_BxG[..., :2 * H]), 2, axis=-1)
            cand = jnp.tanh(xp_BxG[..., 2 * H:] + r * (hp_BxG[..., 2 * H:] + w["b_hh"]))
        else:
            r, z = jnp.split(jax.nn.sigmoid(xp_BxG[..., :2 * H] + h @ w["W_h"]), 2, axis=-1)
            cand = jnp.tanh(xp_BxG[..., 2 * H:] + (r * h) @ w["W_hh"])
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
    def step(self, w, carry, xp_BxG):
        c, h = carry
        H = self.features
        pre_BxG = xp_BxG + h.astype(xp_BxG.dtype) @ w["W_h"]
        i, f, o = jnp.split(jax.nn.sigmoid(pre_BxG[..., :3 * H]), 3, axis=-1)
        c_new = f * c + i * jnp.tanh(pre_BxG[..., 3 * H:])  # in the carry's dtype
        h_new = o * jnp.tanh(c_new)
        return (c_new.astype(c.dtype), h_new.astype(h.dtype)), h_new.astype(xp_BxG.dtype)


CELLS = {"rnn": RNNCell, "gru": GRUCell, "lstm": LSTMCell}


def _check_inputs(inputs_BxTxF, seq_lengths=None):
    """Raises a ValueError for inputs `Recurrent` cannot run: fewer than two axes, an empty time
    axis, or `seq_lengths` whose shape is not the batch shape, whose dtype is not integer, or
    (when its values are concrete, i.e. not traced under jit/vmap) with entries outside
    [0, time]. Traced lengths cannot be checked; out-of-range ones act as if clipped."""
    shape = tuple(inputs_BxTxF.shape)
    if len(shape) < 2:
        raise ValueError(f"inputs have shape {shape}; expected [*batch, time, features]")
    T, batch_shape = shape[-2], shape[:-2]
    if T == 0:
        raise ValueError(f"inputs have shape {shape}: the time axis (-2) has length 0; a "
                         f"recurrent layer needs at least one step")
    if seq_lengths is None:
        return
    if not isinstance(seq_lengths, (jax.Array, np.ndarray)):  # a list, say
        seq_lengths = np.asarray(seq_lengths)
    if tuple(seq_lengths.shape) != batch_shape:
        raise ValueError(f"seq_lengths has shape {tuple(seq_lengths.shape)}; expected the "
                         f"batch shape {batch_shape} of inputs with shape {shape}")
    if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
        raise ValueError(f"seq_lengths has dtype {seq_lengths.dtype}; expected integers")
    try:
        lengths = np.asarray(seq_lengths)
    except jax.errors.TracerArrayConversionError:  # traced: the values exist only at run time
        return
    bad = np.flatnonzero((lengths < 0) | (lengths > T))
    if bad.size:
        index = np.unravel_index(bad[0], lengths.shape)
        raise ValueError(f"seq_lengths[{', '.join(str(int(i)) for i in index)}] = "
                         f"{lengths[index]} is outside [0, time] = [0, {T}] for inputs of "
                         f"shape {shape} ({bad.size} of {lengths.size} entries are)")


class Recurrent(nn.Module):
    """Runs `cell` over inputs [*batch, time, features] with one `jax.lax.scan`.

    The input projection of every time step is one matmul before the scan; the scan body
    is the cell's pure `step` on parameters fetched once, outside the loop, so all steps share
    them. That is why this is a plain `jax.lax.scan` rather than `nn.scan`: nothing inside the
    loop touches Flax variables, so there is nothing to lift (and it works under init/apply/jit).

    `seq_lengths` [*batch] (ints): steps t >= length are padding. The carry is frozen after
    a sequence's own last valid step, and outputs at padded positions are exactly zero. With
    `reverse=True` the scan runs from t = T-1 down to 0 and padded steps leave the carry
    untouched, so each sequence starts at its own last valid token; outputs keep the
    original time order.

    Bad inputs raise a ValueError before anything runs (see `_check_inputs`): an empty time
    axis, `seq_lengths` of the wrong shape or dtype, concrete lengths outside [0, T], and
    inputs whose feature size differs from the one the parameters were made for. Lengths
    traced under jit cannot be checked; there a length above T acts as T and one below 0 as 0.
    """

    cell: nn.Module
    reverse: bool = False
    return_carry: bool = False
    unroll: int = 1

    def __call__(self, inputs_BxTxF, initial_carry=None, *, seq_lengths=None, return_carry=None):
        """Returns outputs_BxTxH, or (final_carry, outputs_BxTxH) if `return_carry`."""
        _check_inputs(inputs_BxTxF, seq_lengths)
        cell, F = self.cell, inputs_BxTxF.shape[-1]
        if initial_carry is None:
            initial_carry = cell.initialize_carry(None, inputs_BxTxF.shape[:-2] + (F,))
        w = cell.weights(F)
        xp_TxBxG = cell.project_inputs(w, jnp.moveaxis(inputs_BxTxF, -2, 0))
        step = functools.partial(cell.step, w)
        if seq_lengths is None:
            carry, y_TxBxH = jax.lax.scan(step, initial_carry, xp_TxBxG, reverse=self.reverse,
                                          unroll=self.unroll)
        else:
            T = xp_TxBxG.shape[0]
            t_Tx1 = jnp.arange(T).reshape((T,) + (1,) * (xp_TxBxG.ndim - 2))
            valid_TxB = t_Tx1 < jnp.asarray(seq_lengths)[None]

            def masked_step(carry, xs):
                xp_BxG, valid_B = xs
                new_carry, y_BxH = step(carry, xp_BxG)
                keep = lambda new, old: jnp.where(valid_B[..., None], new, old)
                return jax.tree.map(keep, new_carry, carry), keep(y_BxH, jnp.zeros_like(y_BxH))

            carry, y_TxBxH = jax.lax.scan(masked_step, initial_carry, (xp_TxBxG, valid_TxB),
                                          reverse=self.reverse, unroll=self.unroll)
        outputs_BxTxH = jnp.moveaxis(y_TxBxH, 0, -2)
        return_carry = self.return_carry if return_carry is None else return_carry
        return (carry, outputs_BxTxH) if return_carry else outputs_BxTxH


class Bidirectional(nn.Module):
    """A forward and a backward (`reverse=True`) `Recurrent` over the same inputs, merged
    along features ('concat': [fwd, bwd], size 2H) or summed ('sum'). The carry is the
    pair (forward_carry, backward_carry)."""

    forward_rnn: Recurrent
    backward_rnn: Recurrent
    merge: str = "concat"
    return_carry: bool = False

    def __call__(self, inputs_BxTxF, initial_carry=None, *, seq_lengths=None, return_carry=None):
        if self.forward_rnn.reverse or not self.backward_rnn.reverse:
            raise ValueError("Bidirectional needs forward_rnn.reverse=False and "
                             "backward_rnn.reverse=True")
        if self.merge not in ("concat", "sum"):
            raise ValueError(f"merge={self.merge!r}; expected 'concat' or 'sum'")
        carry_fwd, carry_bwd = (None, None) if initial_carry is None else initial_carry
        carry_fwd, y_fwd = self.forward_rnn(inputs_BxTxF, carry_fwd, seq_lengths=seq_lengths,
                                            return_carry=True)
        carry_bwd, y_bwd = self.backward_rnn(inputs_BxTxF, carry_bwd, seq_lengths=seq_lengths,
                                             return_carry=True)
        outputs = jnp.concatenate([y_fwd, y_bwd], -1) if self.merge == "concat" else y_fwd + y_bwd
        return_carry = self.return_carry if return_carry is None else return_carry
        return ((carry_fwd, carry_bwd), outputs) if return_carry else outputs


class StackedRecurrent(nn.Module):
    """`num_layers` recurrent layers of one cell type, dropout between layers (not after the
    last one). Bidirectional layers concatenate both directions, so layers after the first
    see 2H features.

    Parameters live under `layer_{i}` (or `layer_{i}_fwd` / `layer_{i}_bwd`), e.g.
    `layer_0/W_xi`. A carry is a tuple with one entry per layer: the cell's carry, or the
    pair (forward, backward) when bidirectional. `forget_bias` applies to LSTM cells and
    `reset_after` to GRU cells.
    """

    cell_type: str
    features: int
    num_layers: int = 1
    dropout_rate: float = 0.0
    bidirectional: bool = False
    unroll: int = 1
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    recurrent_init: Initializer = nn.initializers.orthogonal()
    bias_init: Initializer = nn.initializers.zeros_init()
    forget_bias: float = 0.0
    reset_after: bool = False

    @nn.nowrap
    def _make_cell(self, **kwargs):
        if self.cell_type not in CELLS:
            raise ValueError(
                f"unknown cell_type {self.cell_type!r}; expected one of {sorted(CELLS)}")
        if self.cell_type == "lstm":
            kwargs["forget_bias"] = self.forget_bias
        if self.cell_type == "gru":
            kwargs["reset_after"] = self.reset_after
        return CELLS[self.cell_type](
            self.features, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, recurrent_init=self.recurrent_init,
            bias_init=self.bias_init, **kwargs)

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        """Zero carries for inputs of shape (*batch, in_features): only the batch shape
        input_shape[:-1] matters, every layer's carry has `features` units."""
        one = self._make_cell(parent=None).initialize_carry(rng, input_shape)
        return tuple((one, one) if self.bidirectional else one for _ in range(self.num_layers))

    @nn.compact
    def __call__(self, inputs_BxTxF, initial_carry=None, *, seq_lengths=None,
                 deterministic: bool = True):
        """Returns (carries, outputs_BxTxH), outputs of size 2H when bidirectional."""
        x, carries = inputs_BxTxF, []
        for i in range(self.num_layers):
            if i > 0:
                x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
            if self.bidirectional:
                rnn = Bidirectional(
                    Recurrent(self._make_cell(name=f"layer_{i}_fwd"), unroll=self.unroll),
                    Recurrent(self._make_cell(name=f"layer_{i}_bwd"), reverse=True,
                              unroll=self.unroll))
            else:
                rnn = Recurrent(self._make_cell(name=f"layer_{i}"), unroll=self.unroll)
            layer_carry = None if initial_carry is None else initial_carry[i]
            carry, x = rnn(x, layer_carry, seq_lengths=seq_lengths, return_carry=True)
            carries.append(carry)
        return tuple(carries), x
