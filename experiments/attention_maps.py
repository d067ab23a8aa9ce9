r"""Plots of the sinusoidal positional encoding and of a trained Transformer's attention.

    python launch.py --config experiments/charlm_transformer.py --workdir runs/tlm
    python launch.py --config experiments/attention_maps.py --workdir runs/attention_maps \
        --config.from_workdir=runs/tlm

Writes positional_encoding.png and (with `from_workdir`, a char-LM Transformer trained with
full attention) attention_weights.png into the workdir; see the README.
"""

import ml_collections


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.task = "attention_maps"
    config.encoding = dict(length=64, dim=32)  # the plotted sinusoidal_encoding(length, dim)
    config.from_workdir = ml_collections.config_dict.placeholder(str)  # a trained model, or None
    config.length = 48  # characters of validation text whose attention weights are plotted
    config.lock()
    return config
