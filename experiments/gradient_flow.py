r"""Gradient flow through time in recurrent language models, from the textbook's RNN, GRU and
LSTM to the linear recurrences minGRU, minLSTM and LRU (see the README's plots).

    python launch.py --config experiments/gradient_flow.py --workdir runs/gradient_flow

Trains a small char LM per cell (the config of experiments/charlm.py, smaller and shorter), then
writes gradient_flow.{csv,png} (gradient norm against distance, at initialisation with the
recurrent weights scaled, or for the LRU its eigenvalues on each ring, and after training),
lru_eigenvalues.{csv,png} (the LRU's eigenvalues before and after training), clipping.{csv,png}
(an exploding tanh RNN trained with and without gradient clipping) and symmetry.csv (constant
against random initialisation).
`:tiny` shrinks everything for tests.
"""

import os

import ml_collections

from seqjax.config import load_experiment, parse_arg


def _charlm_config(arg):
    return load_experiment(os.path.join(os.path.dirname(__file__), "charlm.py")).get_config(arg)


def get_config(arg=None):
    args = parse_arg(arg, tiny=False)
    config = ml_collections.ConfigDict()
    config.task = "gradient_flow"
    config.seed = 0
    config.cells = ("rnn", "gru", "lstm", "mingru", "minlstm", "lru")
    config.seq_len = 200  # inputs read before the predicted character
    config.batch_size = 32  # windows of the validation text the norms are averaged over
    config.recurrent_scales = (0.5, 1.0, 2.0)  # W_h* multiplied by these at initialisation
    # The LRU's counterpart (it has no W_h): rings [r_min, r_max] its |lambda| start on, at
    # initialisation; it trains on config.lm.model.linear's ring (0.9, 0.999).
    config.lru_rings = ((0.0, 0.5), (0.5, 0.9), (0.9, 0.999))

    # The char LM trained for each cell and in the runs below.
    config.lm = _charlm_config("tiny" if args.tiny else None)
    config.lm.model.hidden = 128
    config.lm.model.num_layers = 1
    config.lm.model.dropout = 0.0
    config.lm.num_train_steps = 500
    config.lm.eval_every = 250
    config.lm.checkpoint_every = 500
    config.lm.sample = None

    # Exploding gradients: a tanh RNN trained with plain SGD at the textbook's lr of 1, with and
    # without clipping the global gradient norm to clip_norm (the textbook's theta).
    config.clipping = dict(cell="rnn", recurrent_init="orthogonal", lr=1.0, clip_norm=1.0,
                           num_train_steps=300)
    # Every weight set to one constant (biases zero) against the default random initialisation.
    config.symmetry = dict(constant=0.05, num_train_steps=200)

    if args.tiny:
        config.seq_len = 20
        config.batch_size = 4
        config.lm.model.hidden = 8
        config.lm.num_train_steps = 6
        config.lm.eval_every = 6
        config.lm.checkpoint_every = 6
        config.clipping.num_train_steps = 6
        config.symmetry.num_train_steps = 6
    config.lock()
    return config
