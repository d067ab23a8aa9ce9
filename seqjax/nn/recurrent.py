"""Recurrent layers: `Recurrent` (a cell scanned over time, with variable lengths),
`Bidirectional` and `StackedRecurrent`; the cells themselves (RNN, GRU, LSTM) live in
`seqjax.nn.cells` and are importable from here too.

Dimension letters: B batch (any number of leading axes), T time, F input features,
H hidden features (a cell's `features`), G the fused gate axis (number of gates x H).

`Recurrent` projects the whole sequence with one [T*B, F] @ [F, G] matmul and then runs
`jax.lax.scan` over the cell's pure `step`, with the parameters fetched once outside the loop;
its gradient with respect to W_h is one matmul after the loop (see
`Recurrent.fused_weight_grad`).
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.nn import compute, recurrent_scan
from seqjax.nn.cells import CELLS, GRUCell, LSTMCell, RNNCell  # noqa: F401  (re-exported)

Dtype = Any
Initializer = Callable[..., jax.Array]


def check_inputs(inputs_BxTxF, seq_lengths=None):
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

    Bad inputs raise a ValueError before anything runs (see `check_inputs`): an empty time
    axis, `seq_lengths` of the wrong shape or dtype, concrete lengths outside [0, T], and
    inputs whose feature size differs from the one the parameters were made for. Lengths
    traced under jit cannot be checked; there a length above T acts as T and one below 0 as 0.

    `fused_weight_grad` (RNN, LSTM and reset-after GRU; the textbook GRU, whose step has a
    second matmul, always uses autodiff): the scan gets a hand-written VJP that computes the
    recurrent weight gradient dW_h as one [H, T*B] @ [T*B, G] matmul after the backward loop,
    where autodiff accumulates an [H, B] @ [B, G] product at every step (see
    `recurrent_scan.scan_fused_weight_grad`): one large matmul instead of T small ones, with
    the same values and gradients that agree to rounding (speed: benchmarks/README.md). The
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
        check_inputs(inputs_BxTxF, seq_lengths)
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
        scan = recurrent_scan.scan_fused_weight_grad if fused else recurrent_scan.scan
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
    `reset_after` to GRU cells; `fused_weight_grad` is `Recurrent`'s. `remat` rematerialises
    each layer (`seqjax.nn.compute`): its backward pass recomputes the scan from its input.
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
    remat: str = "none"

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
        check_inputs(inputs_BxTxF, seq_lengths)  # here: a rematerialised layer sees tracers
        options = dict(unroll=self.unroll, fused_weight_grad=self.fused_weight_grad)
        x, carries = inputs_BxTxF, []
        for i in range(self.num_layers):
            if i > 0:
                x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
            if self.bidirectional:
                rnn = compute.remat(Bidirectional, self.remat)(
                    Recurrent(self._make_cell(name=f"layer_{i}_fwd"), **options),
                    Recurrent(self._make_cell(name=f"layer_{i}_bwd"), reverse=True, **options),
                    return_carry=True)
            else:
                rnn = compute.remat(Recurrent, self.remat)(
                    self._make_cell(name=f"layer_{i}"), return_carry=True, **options)
            layer_carry = None if initial_carry is None else initial_carry[i]
            carry, x = rnn(x, layer_carry, seq_lengths=seq_lengths)
            carries.append(carry)
        return tuple(carries), x
