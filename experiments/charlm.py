r"""Character-level language model on The Time Machine (LSTM by default).

    python launch.py --config experiments/charlm.py --workdir runs/charlm
    python launch.py --config experiments/charlm.py:cell=gru --workdir runs/charlm_gru
    python launch.py --config experiments/charlm.py --workdir runs/charlm --mode sample \
        --prefix "the time machine" --length 200

Arguments after the colon: `cell=rnn|gru|lstm` (the textbook's cells) or `cell=mingru|minlstm|lru`
(linear recurrences that train in parallel over time), `context=N` (N characters per training
window instead of 64, with the batch shrunk to keep 2,048 characters a batch, down to one window:
the long-context runs of the README), `tiny` (a seconds-long run for tests and laptops).
Any field can be overridden with `--config.opt.lr=0.5`-style flags; an unknown field is an error.
Expected result: see the README's results table.
"""

import ml_collections

from seqjax import sweep
from seqjax.config import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, cell="lstm", context=64, tiny=False)
    config = ml_collections.ConfigDict()
    config.task = "charlm"
    config.seed = 0
    config.num_devices = 0  # 0: every local device
    config.parallel = "pmap"  # or "shard_map": jit(shard_map) over a mesh with one axis, "batch"

    # --- data ---------------------------------------------------------------------------------
    config.data = dict(
        path=ml_collections.config_dict.placeholder(str),  # None: the shipped Time Machine
        preprocess="letters",  # 'letters': a-z and space, as the textbook; 'raw': every character
        min_freq=0,
        valid_fraction=0.1,  # the last 10% of the text is held out
        partition="sequential",  # or 'random'; sequential carries the hidden state across batches
        batch_size=max(1, 32 * 64 // args.context),
        num_steps=args.context,
        eval_batch_size=16 if args.context <= 256 else 1,
    )

    # --- model --------------------------------------------------------------------------------
    config.model = dict(
        cell=args.cell,
        hidden=384,
        num_layers=2,
        embed_dim=0,  # 0: one-hot input as in the textbook, else a learned embedding
        dropout=0.4,  # between layers and before the output layer; this corpus is small
        unroll=1,
        dtype="float32",  # computation; 'bfloat16' keeps params, softmax, norms, logits float32
        param_dtype="float32",
        remat="none",  # 'block' or 'full': recompute each layer's activations in the backward pass
        # linear recurrences (cell=mingru|minlstm|lru): the scan, minGRU/minLSTM's log-space
        # form, and the ring the LRU's eigenvalue moduli start on, and their largest phase
        linear=dict(scan="associative", log_space=False, r_min=0.9, r_max=0.999,
                    max_phase=6.283),
        # initialisers, see seqjax/nn/initializers.py: e.g. 'normal:0.01' as in the textbook
        init=dict(kernel="lecun_normal", recurrent="orthogonal", bias="zeros",
                  head="lecun_normal", forget_bias=0.0),
    )

    # --- optimizer ----------------------------------------------------------------------------
    config.opt = dict(
        name="adamw", lr=2e-3, b1=0.9, b2=0.999, momentum=0.0, weight_decay=0.0,
        schedule="cosine", warmup_steps=100, final_lr_fraction=0.05,
        clip_norm=1.0,  # the textbook's gradient clipping theta; 0 disables it
        grad_accum_steps=1, decay_biases_and_norms=False,
    )

    # --- train, eval and checkpoints ----------------------------------------------------------
    config.num_train_steps = 1500
    config.log_every = 50
    config.eval_every = 100
    config.checkpoint_every = 250
    config.keep_checkpoints = 2
    # patience in evaluations without a better validation loss; target 'metric>=value': 0 / '' off
    config.early_stopping = dict(patience=0, target="")

    # --- sample at the end of training --------------------------------------------------------
    config.sample = dict(prefix="time traveller", length=200, temperature=0.7)

    if args.tiny:
        config.data.batch_size = 8
        config.data.num_steps = 16
        config.data.eval_batch_size = 8
        config.model.hidden = 32
        config.model.num_layers = 1
        config.model.dropout = 0.0
        config.opt.warmup_steps = 2
        config.num_train_steps = 20
        config.log_every = 5
        config.eval_every = 10
        config.checkpoint_every = 10
        config.sample.length = 20
    config.lock()
    return config


def get_sweep():
    """RNN vs GRU vs LSTM at two learning rates:
    `python launch.py --config experiments/charlm.py --sweep --workdir runs/cells --parallel 2`."""
    return sweep.product({"model.cell": ("rnn", "gru", "lstm"), "opt.lr": (2e-3, 5e-3)})
