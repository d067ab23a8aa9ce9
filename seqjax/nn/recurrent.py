"""Recurrent cells (RNN, GRU, LSTM), a scan over time, bidirectional and stacked layers.

Dimension letters: B batch (any number of leading axes), T time, F input features,
H hidden features (a cell's `features`), G the fused gate axis (number of gates x H).

The parameter tree keeps one matrix per textbook equation (`W_xi`, `W_hi`, `b_i`, ...), so a
checkpoint reads like the book and weights can be copied from another library. The cells
compute with them fused: `weights()` concatenates the per-gate kernels along the output axis
into one W_x_FxG and one W_h_HxG, `project_inputs` applies W_x_FxG (and the biases) to every
time step at once, and `step` does only the recurrent product, hp = h @ W_h_HxG, once per time
step, then the elementwise `gates` (the textbook GRU has a second product, (r*h) @ W_hh, which
needs the gates first, so its `gates` does it). `Recurrent` projects the whole sequence with one
[T*B, F] @ [F, G] matmul and then runs `jax.lax.scan` over the pure `step`, with the parameters
fetched once outside the loop; its gradient with respect to W_h is one matmul after the loop
(see `Recurrent.fused_weight_grad`).

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


# ----------------------------------------------------------------------------- scans over time

def _keep_valid(valid_B, carry, new_carry, y_BxH):
    """Padding, where valid_B is False: the carry stays as it was and the output is zero."""
    if valid_B is None:
        return new_carry, y_BxH
    keep = lambda new, old: jnp.where(valid_B[..., None], new, old)
    return jax.tree.map(keep, new_carry, carry), keep(y_BxH, jnp.zeros_like(y_BxH))


def _scan(cell, w, carry0, xp_TxBxG, valid_TxB, *, reverse, unroll):
    """(final carry, y_TxBxH) of `cell.step` over time; `valid_TxB` (or None) masks padding."""
    def step(carry, xs):
        xp_BxG, valid_B = xs
        return _keep_valid(valid_B, carry, *cell.step(w, carry, xp_BxG))

    return jax.lax.scan(step, carry0, (xp_TxBxG, valid_TxB), reverse=reverse, unroll=unroll)


def _scan_fused_weight_grad(cell, w, carry0, xp_TxBxG, valid_TxB, *, reverse, unroll):
    """`_scan` for a cell whose `gates` are elementwise, with a hand-written VJP: the backward
    scan emits the cotangent dhp_t of each step's recurrent product hp_t = h_{t-1} @ W_h, and
    dW_h = sum_t h_{t-1}^T @ dhp_t is then one [H, T*B] @ [T*B, G] matmul, where autodiff adds
    an [H, B] @ [B, G] product into a carried [H, G] sum at every step."""
    w_gates = {k: a for k, a in w.items() if k not in ("W_x", "W_h", "b")}  # W_x, b act via xp
    return _fused_scan(cell, reverse, unroll, w["W_h"], w_gates, carry0, xp_TxBxG, valid_TxB)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_scan(cell, reverse, unroll, W_h, w_gates, carry0, xp_TxBxG, valid_TxB):
    return _scan(cell, {**w_gates, "W_h": W_h}, carry0, xp_TxBxG, valid_TxB, reverse=reverse,
                 unroll=unroll)


def _fused_scan_fwd(cell, reverse, unroll, W_h, w_gates, carry0, xp_TxBxG, valid_TxB):
    """The same scan, also saving each step's incoming carry and hp for the backward pass."""
    def step(carry, xs):
        xp_BxG, valid_B = xs
        hp_BxG = cell.recurrent_input(carry).astype(xp_BxG.dtype) @ W_h
        new_carry, y_BxH = _keep_valid(valid_B, carry, *cell.gates(w_gates, carry, xp_BxG, hp_BxG))
        return new_carry, (y_BxH, carry, hp_BxG)

    carry, (y_TxBxH, carries_T, hp_TxBxG) = jax.lax.scan(
        step, carry0, (xp_TxBxG, valid_TxB), reverse=reverse, unroll=unroll)
    return (carry, y_TxBxH), (W_h, w_gates, carries_T, xp_TxBxG, hp_TxBxG, valid_TxB)


def _fused_scan_bwd(cell, reverse, unroll, residuals, cotangents):
    W_h, w_gates, carries_T, xp_TxBxG, hp_TxBxG, valid_TxB = residuals

    def step(state, xs):  # from step t's cotangents to step t-1's, recomputing the gates
        dcarry, dw_gates = state
        carry, xp_BxG, hp_BxG, valid_B, dy_BxH = xs
        gates = lambda w, carry, xp, hp: _keep_valid(valid_B, carry, *cell.gates(w, carry, xp, hp))
        _, gates_vjp = jax.vjp(gates, w_gates, carry, xp_BxG, hp_BxG)
        dw, dcarry_prev, dxp_BxG, dhp_BxG = gates_vjp((dcarry, dy_BxH))
        _, input_vjp = jax.vjp(lambda c: cell.recurrent_input(c).astype(xp_BxG.dtype), carry)
        (dcarry_via_hp,) = input_vjp(dhp_BxG @ W_h.T)
        dcarry_prev = jax.tree.map(jnp.add, dcarry_prev, dcarry_via_hp)
        # one [T, B, G] array fewer to fill and store when dxp = dhp
        d_BxG = dhp_BxG if cell.gates_see_sum else (dxp_BxG, dhp_BxG)
        return (dcarry_prev, jax.tree.map(jnp.add, dw_gates, dw)), d_BxG

    dcarry_T, dy_TxBxH = cotangents
    (dcarry0, dw_gates), d_TxBxG = jax.lax.scan(
        step, (dcarry_T, jax.tree.map(jnp.zeros_like, w_gates)),
        (carries_T, xp_TxBxG, hp_TxBxG, valid_TxB, dy_TxBxH), reverse=not reverse, unroll=unroll)
    dxp_TxBxG, dhp_TxBxG = (d_TxBxG, d_TxBxG) if cell.gates_see_sum else d_TxBxG
    # The point of this VJP: all steps' weight gradients in one matmul, accumulated in at least
    # float32 (a bfloat16 sum over T*B terms would lose most of its digits).
    h_TxBxH = cell.recurrent_input(carries_T).astype(xp_TxBxG.dtype)
    dW_h = jnp.einsum("t...h,t...g->hg", h_TxBxH, dhp_TxBxG,
                      preferred_element_type=jnp.promote_types(dhp_TxBxG.dtype, jnp.float32))
    dvalid = None if valid_TxB is None else np.zeros(valid_TxB.shape, jax.dtypes.float0)
    return dW_h.astype(W_h.dtype), dw_gates, dcarry0, dxp_TxBxG, dvalid


_fused_scan.defvjp(_fused_scan_fwd, _fused_scan_bwd)


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

    `fused_weight_grad` (RNN, LSTM and reset-after GRU; the textbook GRU, whose step has a
    second matmul, always uses autodiff): the scan gets a hand-written VJP that computes the
    recurrent weight gradient dW_h as one [H, T*B] @ [T*B, G] matmul after the backward loop,
    where autodiff accumulates an [H, B] @ [B, G] product at every step (see
    `_scan_fused_weight_grad`). Values are the same and gradients agree to rounding; on 2
    shared CPU cores the training step of a 1-layer LSTM (H 512, T 128, B 32) was 1.04-1.08x
    faster (median of interleaved rounds), and up to 1.18x at other sizes (2 layers, H 256). The
    caveat: a `jax.custom_vjp` has no forward-mode derivative, so `jax.jvp`, `jax.jacfwd` and
    the function `jax.linearize` returns raise a TypeError with it; set
    `fused_weight_grad=False` for those. Forward-over-reverse (`jax.hessian`) works, since it
    differentiates the VJP's own code.
    """

    cell: nn.Module
    reverse: bool = False
    return_carry: bool = False
    unroll: int = 1
    fused_weight_grad: bool = True

    def __call__(self, inputs_BxTxF, initial_carry=None, *, seq_lengths=None, return_carry=None):
        """Returns outputs_BxTxH, or (final_carry, outputs_BxTxH) if `return_carry`."""
        _check_inputs(inputs_BxTxF, seq_lengths)
        cell, F = self.cell, inputs_BxTxF.shape[-1]
        if initial_carry is None:
            initial_carry = cell.initialize_carry(None, inputs_BxTxF.shape[:-2] + (F,))
        w = cell.weights(F)
        xp_TxBxG = cell.project_inputs(w, jnp.moveaxis(inputs_BxTxF, -2, 0))
        valid_TxB = None
        if seq_lengths is not None:
            T = xp_TxBxG.shape[0]
            t_Tx1 = jnp.arange(T).reshape((T,) + (1,) * (xp_TxBxG.ndim - 2))
            valid_TxB = t_Tx1 < jnp.asarray(seq_lengths)[None]
        fused = self.fused_weight_grad and cell.gates_are_elementwise
        scan = _scan_fused_weight_grad if fused else _scan
        carry, y_TxBxH = scan(cell, w, initial_carry, xp_TxBxG, valid_TxB, reverse=self.reverse,
                              unroll=self.unroll)
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
    `reset_after` to GRU cells; `fused_weight_grad` is `Recurrent`'s.
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
    fused_weight_grad: bool = True

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
        layer = functools.partial(Recurrent, unroll=self.unroll,
                                  fused_weight_grad=self.fused_weight_grad)
        x, carries = inputs_BxTxF, []
        for i in range(self.num_layers):
            if i > 0:
                x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
            if self.bidirectional:
                rnn = Bidirectional(layer(self._make_cell(name=f"layer_{i}_fwd")),
                                    layer(self._make_cell(name=f"layer_{i}_bwd"), reverse=True))
            else:
                rnn = layer(self._make_cell(name=f"layer_{i}"))
            layer_carry = None if initial_carry is None else initial_carry[i]
            carry, x = rnn(x, layer_carry, seq_lengths=seq_lengths, return_carry=True)
            carries.append(carry)
        return tuple(carries), x
