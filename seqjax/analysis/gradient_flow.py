"""Gradient flow through time in recurrent language models (D2L 9.7 and 10.1-10.3).

Measurements on the character LM of `seqjax.tasks.charlm`, each written to the workdir as CSV
and PNG:

1. `gradient_flow.*`: the norm of the gradient of the loss at the last step with respect to the
   input at each earlier step, ||dL_T / dx_t||, against the distance T - t, for each cell, at
   initialisation and after training. Its geometric rate per step (exp of the slope of log-norm
   against distance) summarises it: below 1 gradients vanish, above 1 they explode. What
   "at initialisation" varies depends on the cell (one CSV row set each):
   - rnn, gru, lstm: the recurrent matrices W_h* scaled by each of `config.recurrent_scales`
     (recurrent_scale in the CSV; r_min and r_max empty).
   - mingru, minlstm: scale 1 only. They have no hidden-to-hidden matrix; how far back a
     gradient reaches is set by gates that read only the input, so there is nothing to scale.
   - lru: one row set per ring of `config.lru_rings` (r_min and r_max in the CSV;
     recurrent_scale 1), the ring its eigenvalue moduli |lambda| are drawn from. The ring is
     the LRU's own knob for the same question: the gradient d steps back is carried by
     lambda^d, so the ring bounds its rate from the start.
   The trained row of every cell is the model trained on `config.lm` (the LRU's ring being
   config.lm.model.linear's r_min and r_max).
2. `lru_eigenvalues.*` (when 'lru' is in `config.cells`): the eigenvalues lambda of every LRU
   layer at initialisation and after training, on the complex plane and by modulus.
3. `clipping.*`: training loss of a tanh RNN whose recurrent weights make gradients explode,
   with and without gradient clipping by global norm.
4. `symmetry.csv`: with every weight initialised to one constant, all hidden units of a trained
   RNN stay identical (their largest difference stays zero, up to float32 rounding); with
   random weights they do not.

Training goes through the engine (`seqjax.train.train_and_evaluate`), one sub-workdir per run,
so every run resumes and its metrics and checkpoints can be inspected like any other.
"""

import json
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax import config as config_lib
from seqjax import files
from seqjax.analysis import gradient_flow_plots as plots
from seqjax.nn.linear_recurrent import LINEAR_CELLS, lru_lambda
from seqjax.nn.recurrent import CELLS
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
    """A copy of `params` with every recurrent matrix W_h* multiplied by `scale`. Parameters
    without one (the linear recurrences') are refused for any scale but 1, so that a row is
    never labelled with a scaling that did not happen."""
    def is_recurrent(path):
        name = getattr(path[-1], "key", None)
        return isinstance(name, str) and name.startswith("W_h")

    leaves = jax.tree_util.tree_leaves_with_path(params)
    if scale != 1 and not any(is_recurrent(path) for path, _ in leaves):
        raise ValueError(f"scale {scale:g}: these parameters have no recurrent matrix W_h*")
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * scale if is_recurrent(path) else x, params)


def lru_eigenvalues(params) -> dict[str, np.ndarray]:
    """{layer path ('rnn/block_0'): its lambda} for every LRU layer in `params`, found by its
    parameters nu_log and theta_log, so that stacked and bidirectional layers all appear."""
    found = {}

    def visit(path, tree):
        if not isinstance(tree, Mapping):
            return
        if "nu_log" in tree and "theta_log" in tree:
            found["/".join(path)] = np.asarray(lru_lambda(tree["nu_log"], tree["theta_log"]))
        for key, value in tree.items():
            visit(path + (str(key),), value)

    visit((), params.get("params", params))
    return found


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
    cells = sorted(CELLS) + sorted(LINEAR_CELLS)
    for cell in config.cells:
        config_lib.expect(cell in cells, "cells", config.cells, f"expected cells from {cells}")
    for scale in config.recurrent_scales:
        config_lib.expect(isinstance(scale, (int, float)) and 0 < scale < math.inf,
                          "recurrent_scales", config.recurrent_scales, "expected positive numbers")
    for ring in config.lru_rings:
        config_lib.expect(
            isinstance(ring, (tuple, list)) and len(ring) == 2
            and all(isinstance(r, (int, float)) for r in ring)
            and 0 <= ring[0] < ring[1] <= 1, "lru_rings", config.lru_rings,
            "expected (r_min, r_max) pairs with 0 <= r_min < r_max <= 1")
    config_lib.expect(config.clipping.cell in CELLS, "clipping.cell", config.clipping.cell,
                      f"expected one of {sorted(CELLS)}")
    value = config_lib.expect_type(config, "clipping.clip_norm", (int, float))
    config_lib.expect(value > 0, "clipping.clip_norm", value, "must be > 0")
    value = config_lib.expect_type(config, "symmetry.constant", (int, float))
    config_lib.expect(value != 0, "symmetry.constant", value, "must be non-zero")
    checks.check_config(config.lm)
    for cell in dict.fromkeys((config.lm.model.cell, *config.cells)):
        charlm.check_config(_lm_config(config, **{"model.cell": cell}))


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


def initial_params(task, lm):
    """The parameters training started from: the engine draws them from the first half of
    PRNGKey(seed) split in two (`seqjax.train.loop`), so that before and after are the same
    weights, eigenvalue by eigenvalue."""
    return task.init_params(jax.random.split(jax.random.PRNGKey(lm.seed))[0])


def _initialisations(config, lm, cell, task, run_dir):
    """[(recurrent scale, ring or None, params)] at initialisation, as the module docstring says
    for each cell."""
    initial = initial_params(task, lm)
    if cell in CELLS:
        return [(s, None, scale_recurrent(initial, s)) for s in config.recurrent_scales]
    if cell != "lru":
        return [(1.0, None, initial)]
    measured = []
    for r_min, r_max in config.lru_rings:
        ring_lm = _lm_config(config, **{"model.cell": cell, "model.linear.r_min": float(r_min),
                                        "model.linear.r_max": float(r_max)})
        measured.append((1.0, (r_min, r_max),
                         initial_params(charlm.build(ring_lm, run_dir), ring_lm)))
    return measured


def run(config, workdir: str) -> dict:
    """Runs the measurements; returns a summary, also saved as summary.json."""
    check_config(config)
    workdir = files.absolute(workdir)
    files.makedirs(workdir)
    if jax.process_index() == 0:
        config_lib.save(config, workdir)
    summary = {}

    # 1. gradient norm against distance, at initialisation and after training; 2. the LRU's
    # eigenvalues before and after.
    rows, eigenvalues = [], {}
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
        lm_ring = (lm.model.linear.r_min, lm.model.linear.r_max) if cell == "lru" else None
        measured = [("init", *m) for m in _initialisations(config, lm, cell, task, run_dir)]
        measured.append(("trained", 1.0, lm_ring, trained))
        for state, scale, ring, params in measured:
            norms = input_gradient_norms(model, params, tokens)
            r_min, r_max = ring or (None, None)
            rows += [dict(cell=cell, state=state, recurrent_scale=scale, r_min=r_min, r_max=r_max,
                          distance=d, grad_norm=float(n)) for d, n in enumerate(norms)]
            variant = f"ring{r_min:g}-{r_max:g}" if ring and state == "init" else f"x{scale:g}"
            summary[f"{cell}_{state}_{variant}_rate"] = geometric_rate(norms)
        summary[f"{cell}_val_perplexity"] = results["val_perplexity"]
        if cell == "lru":
            for when, params in (("init", initial_params(task, lm)), ("trained", trained)):
                for layer, lam in lru_eigenvalues(params).items():
                    eigenvalues[layer, when] = lam
                    key = f"lru_{layer.replace('/', '_')}_{when}_modulus"
                    summary[f"{key}_min"] = float(np.abs(lam).min())
                    summary[f"{key}_median"] = float(np.median(np.abs(lam)))
                    summary[f"{key}_max"] = float(np.abs(lam).max())
    files.write_csv(os.path.join(workdir, "gradient_flow.csv"), rows)
    plots.plot_gradient_flow(rows, os.path.join(workdir, "gradient_flow.png"))
    if eigenvalues:
        files.write_csv(os.path.join(workdir, "lru_eigenvalues.csv"),
                   [dict(layer=layer, when=when, modulus=float(abs(lam)),
                         phase=float(np.angle(lam)))
                    for (layer, when), lams in eigenvalues.items() for lam in lams])
        plots.plot_lru_eigenvalues(eigenvalues, config.lm.model.linear,
                              os.path.join(workdir, "lru_eigenvalues.png"))

    # 3. exploding gradients with and without clipping.
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
    files.write_csv(os.path.join(workdir, "clipping.csv"),
               [dict(clip_norm=theta, step=s, loss=loss) for theta, (curve, _) in curves.items()
                for s, loss in curve])
    plots.plot_clipping(curves, c, os.path.join(workdir, "clipping.png"))

    # 4. symmetry: one constant for every weight vs random initialisation.
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
    files.write_csv(os.path.join(workdir, "symmetry.csv"), sym_rows)

    files.write_from_process_0(os.path.join(workdir, "summary.json"),
                               json.dumps(summary, indent=2))
    return summary


def _windows(ids, length: int, batch_size: int, seed: int) -> jnp.ndarray:
    """`batch_size` random windows of `length` tokens of `ids`."""
    if len(ids) < length + 1:
        raise ValueError(f"config.seq_len={length - 1}: the validation text has only "
                         f"{len(ids)} tokens")
    starts = np.random.default_rng(seed).integers(0, len(ids) - length, batch_size)
    return jnp.asarray(np.stack([ids[s:s + length] for s in starts]))
