"""Optimisers and learning-rate schedules from `config.opt`, all through optax."""

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
    """step -> the learning rate that `make_optimizer` applies at training step `step`."""
    schedule = _update_schedule(opt, total_steps)
    return lambda step: float(schedule(step // opt.grad_accum_steps))


def make_optimizer(opt, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (the textbook's theta; 0 disables it), then the optimiser.

    With `opt.grad_accum_steps > 1` gradients of that many consecutive steps are averaged
    before one update (optax.MultiSteps), so the schedule counts updates, not steps.
    """
    lr = _update_schedule(opt, total_steps)
    if opt.name == "adam":
        update = optax.adam(lr, b1=opt.b1, b2=opt.b2)
    elif opt.name == "adamw":
        update = optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
    elif opt.name == "sgd":
        update = optax.sgd(lr, momentum=opt.momentum or None)
    else:
        raise ValueError(f"config.opt.name={opt.name!r}: expected one of {OPTIMIZERS}")
    tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), update) if opt.clip_norm else update
    if opt.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.grad_accum_steps)
    return tx
