"""Optimisers and learning-rate schedules from `config.opt`, all through optax."""

import jax
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(opt, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `opt.lr` over `opt.warmup_steps`, then constant, cosine or linear
    decay to `opt.lr * opt.final_lr_fraction` at `total_steps`."""
    warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = opt.lr * opt.final_lr_fraction
    if opt.schedule == "constant":
        decay = optax.constant_schedule(opt.lr)
    elif opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(opt.lr, decay_steps, alpha=opt.final_lr_fraction)
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(opt.lr, end, decay_steps)
    else:
        raise ValueError(f"config.opt.schedule={opt.schedule!r}: expected one of {SCHEDULES}")
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup), decay], [warmup])


def _update_schedule(opt, total_steps: int) -> optax.Schedule:
    return learning_rate_schedule(opt, max(total_steps // opt.grad_accum_steps, 1))


def learning_rate_at(opt, total_steps: int):
    """step -> the learning rate `make_optimizer` gives the update that training step `step`
    (a batch; a micro-step with gradient accumulation) goes into: update step // k."""
    schedule = _update_schedule(opt, total_steps)
    return lambda step: float(schedule(step // opt.grad_accum_steps))


# Names (a parameter's last path key) of biases and norm gains, never decayed: Flax's 'bias'
# (Dense, DenseGeneral, LayerNorm, BERT's MLM output bias) and LayerNorm's gain 'scale'.
_NO_DECAY_NAMES = ("bias", "scale")


def decay_mask(params):
    """params -> the same tree of bools: True where AdamW's weight decay applies.

    The rule of BERT and the Transformer literature (BERT's `exclude_from_weight_decay` of
    'bias' and 'LayerNorm', nanoGPT's "2-D parameters only"): decay the matrices -- kernels, the
    textbook cells' W_x* and W_h*, embeddings, learned positions, additive attention's w_v,
    the LRU's B and C -- where decay is the L2 prior on weights it stands for; leave biases
    ('bias', the cells' 'b_*') and LayerNorm's 'scale' alone, since pulling a bias or a gain
    towards 0 does not make the model simpler, it shifts or silences what the next layer sees.
    A parameter is decayed when it has at least two axes and is not named like a bias or a
    gain (attention's DenseGeneral biases have two axes, [heads, head_dim]).

    Vectors are not decayed, which settles the LRU's diagonal parameters too. `nu_log`,
    `theta_log` and `gamma_log` are logarithms: decay pulls them towards 0, i.e. every
    eigenvalue modulus towards exp(-1), every phase towards 1 radian and the normalisation
    towards 1 -- a drift to an arbitrary point that undoes the ring initialisation's long
    memory, not a shrinkage (S5's reference code likewise trains its eigenvalues with plain
    Adam). The skip gain `D` is a per-feature gain, like LayerNorm's scale.
    """
    def decayed(path, x):
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
        bias = name in _NO_DECAY_NAMES or name.startswith("b_")
        return len(getattr(x, "shape", ())) >= 2 and not bias
    return jax.tree_util.tree_map_with_path(decayed, params)


def _masked_decay(weight_decay: float, mask) -> optax.GradientTransformation:
    """optax.add_decayed_weights where `mask(params)` is True, with that transform's own state.

    `optax.adamw(mask=...)` wraps the decay in optax.masked, whose MaskedState node changes
    the optimizer state's tree: orbax then cannot restore a checkpoint written without a mask
    (every run before `opt.decay_biases_and_norms` existed) and reports it as damaged. Masking
    the decay's output instead keeps the tree of `optax.adamw(mask=None)`, so the switch can
    change on resume like `opt.weight_decay` itself.
    """
    decay = optax.add_decayed_weights(weight_decay)

    def update(updates, state, params):
        decayed, state = decay.update(updates, state, params)
        return jax.tree.map(lambda m, d, u: d if m else u, mask(params), decayed, updates), state
    return optax.GradientTransformation(decay.init, update)


def _adamw(opt, lr) -> optax.GradientTransformation:
    """optax.adamw, decaying only the parameters of `decay_mask` unless
    `opt.decay_biases_and_norms` (absent from configs written before it existed: their rule,
    decay everything)."""
    if opt.get("decay_biases_and_norms", True):
        return optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
    return optax.chain(optax.scale_by_adam(b1=opt.b1, b2=opt.b2),
                       _masked_decay(opt.weight_decay, decay_mask),
                       optax.scale_by_learning_rate(lr))


def make_optimizer(opt, total_steps: int, frozen=()) -> optax.GradientTransformation:
    """Global-norm clipping (the textbook's theta; 0 disables it), then the optimiser.

    With `opt.grad_accum_steps > 1` gradients of that many consecutive steps are averaged
    before one update (optax.MultiSteps), so the schedule counts updates, not steps. The
    top-level parameter modules named in `frozen` get no update at all (no weight decay
    either), and no optimizer state.
    """
    lr = _update_schedule(opt, total_steps)
    if opt.name == "adam":
        update = optax.adam(lr, b1=opt.b1, b2=opt.b2)
    elif opt.name == "adamw":
        update = _adamw(opt, lr)
    elif opt.name == "sgd":
        update = optax.sgd(lr, momentum=opt.momentum or None)
    else:
        raise ValueError(f"config.opt.name={opt.name!r}: expected one of {OPTIMIZERS}")
    tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), update) if opt.clip_norm else update
    if frozen:
        label = lambda params: {"params": {name: jax.tree.map(
            lambda _, n=name: "frozen" if n in frozen else "trained", module)
            for name, module in params["params"].items()}}
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, label)
    if opt.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.grad_accum_steps)
    return tx
