"""The pure per-device steps: functions of (state, batch) with collectives over the named axis
`AXIS`, compiled by a backend of `parallel` (pmap or jit of shard_map)."""

from typing import Any

import flax
import jax
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; the key of a step and device is folded from it
    carry: Any  # per-device state carried from batch to batch (see tasks.Task)


def state_specs() -> TrainState:
    """shard_map's specs of a TrainState: the carry split over the devices, the rest replicated."""
    return TrainState(step=P(), params=P(), opt_state=P(), rng=P(), carry=P(AXIS))


def train_step(state: TrainState, batch, *, loss_fn, tx):
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(AXIS))

    def loss_sum(params):
        sums, carry = loss_fn(params, batch, state.carry, rng=rng, train=True)
        return sums["loss"], (sums, carry)

    grads, (sums, carry) = jax.grad(loss_sum, has_aux=True)(state.params)
    # Mean over every token of the global batch, whatever its split across devices.
    weight = lax.pmean(sums["weight"], AXIS)
    grads = jax.tree.map(lambda g: g / weight, lax.pmean(grads, AXIS))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(lax.psum(sums, AXIS), grad_norm=optax.tree_utils.tree_norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, carry=carry)
    return new_state, metrics


def eval_step(params, carry, batch, *, loss_fn):
    sums, carry = loss_fn(params, batch, carry, rng=None, train=False)
    return lax.psum(sums, AXIS), carry
