"""How a model spends memory and precision, chosen by config rather than written into each
module: rematerialisation of its blocks and float32 output products.

Rematerialisation (`REMAT`): the backward pass needs the activations of the forward one.
'none' keeps them all; 'block' wraps each Transformer block or recurrent layer in
`jax.checkpoint` with the policy `dots_with_no_batch_dims_saveable`, which keeps the outputs of
products with the weights and recomputes the rest in the backward pass (attention scores and
softmax, activations, norms: the large [B, H, L, L] arrays and the cheap elementwise work);
'full' keeps nothing but each block's input and recomputes the whole block. `dots_saveable`,
`dots_with_no_batch_dims_saveable` and `nothing_saveable` name `jax.checkpoint_policies`
applied to each block. The parameters, and so the checkpoints, are the same for every
choice.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _real_only(policy):
    """`policy`, saving no complex value (JAX's remat cannot save one: an LRU's state is
    complex, so its layer recomputes those)."""
    def save(prim, *avals, **params):
        if any(jnp.issubdtype(getattr(a, "dtype", jnp.float32), jnp.complexfloating)
               for a in avals):
            return False
        return policy(prim, *avals, **params)
    return save


_cp = jax.checkpoint_policies
POLICIES = {"block": _cp.dots_with_no_batch_dims_saveable, "full": _cp.nothing_saveable}
POLICIES.update({name: getattr(_cp, name) for name in (
    "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")})
POLICIES = {name: _real_only(policy) for name, policy in POLICIES.items()}
REMAT = ("none", *POLICIES)

# A product whose output is float32 whatever its inputs' dtype, for the heads whose logits feed a
# softmax: the sum over the hidden features is never rounded to bfloat16.
float32_dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


def check_remat(remat: str):
    if remat not in REMAT:
        raise ValueError(f"remat={remat!r}: expected one of {REMAT}")


def remat(module_cls, remat: str, static_argnums: tuple = ()):
    """`module_cls`, or its rematerialised version under the policy `remat` names.
    `static_argnums` index the `__call__` arguments that are Python values (self is 0), such as
    `deterministic`: they must be passed positionally."""
    check_remat(remat)
    if remat == "none":
        return module_cls
    return nn.remat(module_cls, policy=POLICIES[remat], static_argnums=static_argnums)
