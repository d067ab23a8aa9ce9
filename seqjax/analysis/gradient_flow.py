"""Gradient flow through time in recurrent language models (D2L 9.7 and 10.1-10.3).

Three measurements on the character LM of `seqjax.tasks.charlm`, each written to the workdir as
CSV and PNG:

1. `gradient_flow.*`: the norm of the gradient of the loss at the last step with respect to the
   input at each earlier step, ||dL_T / dx_t||, against the distance T - t, for each cell, at
   initialisation (with the recurrent weights scaled down and up) and after training. Its
   geometric rate per step (exp of the slope of log-norm against distance) summarises it:
   below 1 gradients vanish, above 1 they explode.
2. `clipping.*`: training loss of a tanh RNN whose recurrent weights make gradients explode,
   with and without gradient clipping by global norm.
3. `symmetry.csv`: with every weight initialised to one constant, all hidden units of a trained
   RNN stay identical (their largest difference stays zero, up to float32 rounding); with
   random weights they do not.

Training goes through the engine (`seqjax.train.train_and_evaluate`), one sub-workdir per run,
so every run resumes and its metrics and checkpoints can be inspected like any other.
"""

import csv
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax import config as config_lib
from seqjax.nn.recurrent import CELLS
from seqjax.plotting import pyplot
from seqjax.tasks import charlm
from seqjax.train import checks
from seqjax.train.loop import train_and_evaluate
from seqjax.train.metrics import read_metrics
from seqjax.train.saved_runs import restore_run

# ---------------------------------------------------------------------------------------------
# Measurements: pure functions of a model, its parameters and data.
# ---------------------------------------------------------------------------------------------

def input_vectors(model, params, tokens_BxT):
    """What the recurrent layers read: embeddings, or one-hot vectors without an embedding."""
    if model.embed_dim:
        return params["params"]["embed"]["embedding"][tokens_BxT]
    return jax.nn.one_hot(tokens_BxT, model.vocab_size)


def input_gradient_norms(model, params, tokens_BxT1) -> np.ndarray:
    """||dL_T / dx_t|| for t = T-1 down to 0 (so index d is the distance T-1-t), averaged over
    the batch, where L_T is the cross-entropy of predicting tokens[:, T] after reading
    tokens[:, :T] from a zero state."""
    inputs_BxT, target_B = tokens_BxT1[:, :-1], tokens_BxT1[:, -1]

    def last_loss(x_BxTxF):
        logits_BxTxV, _ = model.apply(params, x_BxTxF, method=model.logits_from_inputs)
        # A sum, so that each example's gradient is that of its own loss.
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV[:, -1], target_B).sum()

    grad_BxTxF = jax.grad(last_loss)(input_vectors(model, params, inputs_BxT))
    norms_T = jnp.linalg.norm(grad_BxTxF, axis=-1).mean(0)
    return np.asarray(norms_T[::-1])


def geometric_rate(norms_by_distance) -> float:
    """exp of the least-squares slope of log(norm) against distance: the factor by which the
    gradient grows (> 1) or shrinks (< 1) per step back in time."""
    norms = np.asarray(norms_by_distance, np.float64)
    ok = np.isfinite(norms) & (norms > 0)
    if ok.sum() < 2:
        return float("nan")
    slope = np.polyfit(np.arange(len(norms))[ok], np.log(norms[ok]), 1)[0]
    return float(np.exp(slope))


def scale_recurrent(params, scale: float):
    """A copy of `params` with every recurrent matrix W_h* multiplied by `scale`."""
    def scaled(path, x):
        name = getattr(path[-1], "key", None)
        return x * scale if isinstance(name, str) and name.startswith("W_h") else x
    return jax.tree_util.tree_map_with_path(scaled, params)


def unit_spread(params) -> float:
    """The largest difference between any hidden unit's weights and those of unit 0, over
    every weight of the first recurrent layer that belongs to one unit (its columns of W_x*
    and W_h*, its row of W_h*, its entries of b_*) and its row of the output layer."""
    layer = params["params"]["rnn"]["layer_0"]
    per_unit = []
    for name, w in sorted(layer.items()):
        w = np.asarray(w)
        if w.ndim == 2:
            per_unit.append(w.T)
            if name.startswith("W_h"):
                per_unit.append(w)
        else:
            per_unit.append(w[:, None])
    per_unit.append(np.asarray(params["params"]["head"]["kernel"]))
    units_HxD = np.concatenate(per_unit, axis=1)
    return float(np.abs(units_HxD - units_HxD[:1]).max())


# ---------------------------------------------------------------------------------------------
# The experiment.
# ---------------------------------------------------------------------------------------------

def check_config(config):
    config_lib.expect_positive_int(config, "seq_len", "batch_size", "clipping.num_train_steps",
                                   "symmetry.num_train_steps")
    for cell in config.cells:
        config_lib.expect(cell in CELLS, "cells", config.cells,
                          f"expected cells from {sorted(CELLS)}")
    for scale in config.recurrent_scales:
        config_lib.expect(isinstance(scale, (int, float)) and 0 < scale < math.inf,
                          "recurrent_scales", config.recurrent_scales, "expected positive numbers")
    config_lib.expect(config.clipping.cell in CELLS, "clipping.cell", config.clipping.cell,
                      f"expected one of {sorted(CELLS)}")
    value = config_lib.expect_type(config, "clipping.clip_norm", (int, float))
    config_lib.expect(value > 0, "clipping.clip_norm", value, "must be > 0")
    value = config_lib.expect_type(config, "symmetry.constant", (int, float))
    config_lib.expect(value != 0, "symmetry.constant", value, "must be non-zero")
    checks.check_config(config.lm)
    charlm.check_config(config.lm)


def _lm_config(config, **overrides):
    """The experiment's char LM config with `overrides` ('model.cell': 'gru', ...)."""
    return config_lib.override(config.lm, overrides, "config.lm")


def _train(lm, workdir):
    """Trains (or resumes) one char LM; returns (results, error message or None)."""
    try:
        return train_and_evaluate(lm, workdir), None
    except FloatingPointError as e:
        return None, str(e)


def _train_losses(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(workdir, "train")]


def run(config, workdir: str) -> dict:
    """Runs the three measurements; returns a summary, also saved as summary.json."""
    check_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    config_lib.save(config, workdir)
    summary = {}

    # 1. gradient norm against distance, at initialisation (scaled) and after training.
    rows = []
    for cell in config.cells:
        lm = _lm_config(config, **{"model.cell": cell})
        run_dir = os.path.join(workdir, f"lm_{cell}")
        results, error = _train(lm, run_dir)
        if error:
            raise FloatingPointError(f"training the {cell} LM diverged: {error}")
        _, task, trained, _ = restore_run(run_dir)
        vocab, _, valid_ids = charlm.load_corpus(lm, run_dir)
        model = charlm.make_model(lm, len(vocab))
        tokens = _windows(valid_ids, config.seq_len + 1, config.batch_size, config.seed)
        initial = task.init_params(jax.random.PRNGKey(lm.seed))
        measured = [("init", s, scale_recurrent(initial, s)) for s in config.recurrent_scales]
        measured.append(("trained", 1.0, trained))
        for state, scale, params in measured:
            norms = input_gradient_norms(model, params, tokens)
            rows += [dict(cell=cell, state=state, recurrent_scale=scale, distance=d,
                          grad_norm=float(n)) for d, n in enumerate(norms)]
            summary[f"{cell}_{state}_x{scale:g}_rate"] = geometric_rate(norms)
        summary[f"{cell}_val_perplexity"] = results["val_perplexity"]
    _write_csv(os.path.join(workdir, "gradient_flow.csv"), rows)
    _plot_gradient_flow(rows, os.path.join(workdir, "gradient_flow.png"))

    # 2. exploding gradients with and without clipping.
    curves = {}
    c = config.clipping
    for theta in (0.0, c.clip_norm):
        run_dir = os.path.join(workdir, f"clip_{theta:g}")
        lm = _lm_config(
            config, **{
                "model.cell": c.cell, "model.init.recurrent": c.recurrent_init,
                "opt.name": "sgd", "opt.lr": c.lr, "opt.clip_norm": theta, "opt.warmup_steps": 0,
                "opt.schedule": "constant", "num_train_steps": c.num_train_steps, "log_every": 1,
                "eval_every": c.num_train_steps, "checkpoint_every": c.num_train_steps})
        _, error = _train(lm, run_dir)
        curves[theta] = (_train_losses(run_dir), error)
        last = curves[theta][0][-1] if curves[theta][0] else (0, float("nan"))
        key = "clipped" if theta else "unclipped"
        summary[f"{key}_final_train_loss"] = float("nan") if error else last[1]
        summary[f"{key}_diverged"] = error is not None
    _write_csv(os.path.join(workdir, "clipping.csv"),
               [dict(clip_norm=theta, step=s, loss=loss) for theta, (curve, _) in curves.items()
                for s, loss in curve])
    _plot_clipping(curves, c, os.path.join(workdir, "clipping.png"))

    # 3. symmetry: one constant for every weight vs random initialisation.
    s = config.symmetry
    sym_rows = []
    constant = f"constant:{s.constant}"
    for init_name, init in (("constant", dict(kernel=constant, recurrent=constant, head=constant,
                                              bias="zeros")),
                            ("random", {})):
        overrides = {"model.cell": "rnn", "model.dropout": 0.0,
                     "num_train_steps": s.num_train_steps,
                     "eval_every": s.num_train_steps, "checkpoint_every": s.num_train_steps,
                     **{f"model.init.{k}": v for k, v in init.items()}}
        run_dir = os.path.join(workdir, f"symmetry_{init_name}")
        results, error = _train(_lm_config(config, **overrides), run_dir)
        if error:
            raise FloatingPointError(f"the symmetry run {run_dir} diverged: {error}")
        _, _, params, _ = restore_run(run_dir)
        spread = unit_spread(params)
        sym_rows.append(dict(init=init_name, steps=s.num_train_steps, max_unit_difference=spread,
                             train_perplexity=results.get("train_perplexity")))
        summary[f"symmetry_{init_name}_max_unit_difference"] = spread
    _write_csv(os.path.join(workdir, "symmetry.csv"), sym_rows)

    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def _windows(ids, length: int, batch_size: int, seed: int) -> jnp.ndarray:
    """`batch_size` random windows of `length` tokens of `ids`."""
    if len(ids) < length + 1:
        raise ValueError(f"config.seq_len={length - 1}: the validation text has only "
                         f"{len(ids)} tokens")
    starts = np.random.default_rng(seed).integers(0, len(ids) - length, batch_size)
    return jnp.asarray(np.stack([ids[s:s + length] for s in starts]))


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot_gradient_flow(rows, path):
    plt = pyplot()
    panels = sorted({(r["state"], r["recurrent_scale"]) for r in rows},
                    key=lambda p: (p[0] == "trained", p[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), sharey=True,
                             squeeze=False)
    for ax, (state, scale) in zip(axes[0], panels):
        for cell in dict.fromkeys(r["cell"] for r in rows):
            points = [(r["distance"], r["grad_norm"]) for r in rows
                      if (r["cell"], r["state"], r["recurrent_scale"]) == (cell, state, scale)]
            ax.semilogy(*zip(*points), label=cell)
        ax.set_title(f"{state}" + (f", W_h x {scale:g}" if state == "init" else ""))
        ax.set_xlabel("distance T - t (steps)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("||dL_T / dx_t||")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_clipping(curves, c, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for theta, (curve, error) in curves.items():
        label = f"clip_norm={theta:g}" if theta else "no clipping"
        if error:
            label += " (diverged)"
        if curve:
            ax.plot(*zip(*curve), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{c.cell}, SGD lr {c.lr:g}, recurrent init {c.recurrent_init}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
