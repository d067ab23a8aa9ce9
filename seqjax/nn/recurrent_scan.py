"""Scans of a recurrent cell over time (`Recurrent` runs one of them): `scan`, a `lax.scan` of
the cell's pure `step` with padded steps masked, and `scan_fused_weight_grad`, the same forward
with a hand-written VJP whose recurrent weight gradient is one matmul after the backward loop.

Dimension letters: B batch, T time, H hidden features, G the fused gate axis.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _keep_valid(valid_B, carry, new_carry, y_BxH):
    """Padding, where valid_B is False: the carry stays as it was and the output is zero."""
    if valid_B is None:
        return new_carry, y_BxH
    keep = lambda new, old: jnp.where(valid_B[..., None], new, old)
    return jax.tree.map(keep, new_carry, carry), keep(y_BxH, jnp.zeros_like(y_BxH))


def scan(cell, w, carry0, xp_TxBxG, valid_TxB, *, reverse, unroll):
    """(final carry, y_TxBxH) of `cell.step` over time; `valid_TxB` (or None) masks padding."""
    def step(carry, xs):
        xp_BxG, valid_B = xs
        return _keep_valid(valid_B, carry, *cell.step(w, carry, xp_BxG))

    return jax.lax.scan(step, carry0, (xp_TxBxG, valid_TxB), reverse=reverse, unroll=unroll)


def scan_fused_weight_grad(cell, w, carry0, xp_TxBxG, valid_TxB, *, reverse, unroll):
    """`scan` for a cell whose `gates` are elementwise, with a hand-written VJP: the backward
    scan emits the cotangent dhp_t of each step's recurrent product hp_t = h_{t-1} @ W_h, and
    dW_h = sum_t h_{t-1}^T @ dhp_t is then one [H, T*B] @ [T*B, G] matmul, where autodiff adds
    an [H, B] @ [B, G] product into a carried [H, G] sum at every step."""
    w_gates = {k: a for k, a in w.items() if k not in ("W_x", "W_h", "b")}  # W_x, b act via xp
    return _fused_scan(cell, reverse, unroll, w["W_h"], w_gates, carry0, xp_TxBxG, valid_TxB)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_scan(cell, reverse, unroll, W_h, w_gates, carry0, xp_TxBxG, valid_TxB):
    return scan(cell, {**w_gates, "W_h": W_h}, carry0, xp_TxBxG, valid_TxB, reverse=reverse,
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
