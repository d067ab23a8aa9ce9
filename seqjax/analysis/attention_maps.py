"""Pictures of attention: the sinusoidal positional encoding, and the attention weights of a
trained char-LM Transformer (`seqjax.tasks.charlm_transformer`) on a window of held-out text.

Writes to the workdir:
- `positional_encoding.png`: PE(pos, dim) of `sinusoidal_encoding` as a heatmap (position
  against dimension) beside four of its columns as curves: low dimensions oscillate fast,
  high ones slowly, so each position gets a distinct code.
- `attention_weights.png` (when `config.from_workdir` names a trained model with full
  attention): one heatmap per layer and head, query position against key position, for the
  first `config.length` characters of the validation text.
"""

import os

import jax.numpy as jnp
import numpy as np

from seqjax import config as config_lib
from seqjax import files, plotting
from seqjax.nn import position
from seqjax.tasks import charlm, charlm_transformer
from seqjax.train.saved_runs import restore_run


def check_config(config):
    config_lib.expect_positive_int(config, "encoding.length", "encoding.dim", "length")


def attention_weights(config_saved, params, vocab, text: str) -> np.ndarray:
    """[layers, heads, L, L] weights of a full-attention `TransformerLM` reading `text`."""
    model = charlm_transformer.make_model(config_saved, len(vocab))
    tokens = jnp.asarray(vocab.encode(list(text)))[None]
    _, state = model.apply(params, tokens, mutable=["intermediates"])
    blocks = state["intermediates"]
    return np.stack([blocks[f"block{i}"]["attention"]["attention_weights"][0][0]
                     for i in range(model.num_layers)])


def run(config, workdir: str) -> dict:
    check_config(config)
    files.makedirs(workdir)
    results = {"positional_encoding": os.path.join(workdir, "positional_encoding.png")}
    _plot_encoding(position.sinusoidal_encoding(config.encoding.length, config.encoding.dim),
                   results["positional_encoding"])
    if not config.from_workdir:
        return results

    saved, _, params, step = restore_run(config.from_workdir, which="best")
    if saved.task != "charlm_transformer" or saved.model.attention != "full":
        raise ValueError(f"config.from_workdir={config.from_workdir!r}: expected a "
                         f"charlm_transformer run with model.attention='full', found task "
                         f"{saved.task!r}" + (f" with attention {saved.model.attention!r}"
                                              if saved.task == "charlm_transformer" else ""))
    length = min(config.length, saved.data.num_steps)
    vocab, _, valid_ids = charlm.load_corpus(saved, config.from_workdir)
    text = "".join(vocab.to_tokens(valid_ids[:length].tolist()))
    weights = attention_weights(saved, params, vocab, text)
    results["attention_weights"] = os.path.join(workdir, "attention_weights.png")
    _plot_weights(weights, text, step, results["attention_weights"])
    return results


def _plot_encoding(pe_LxD, path):
    plt = plotting.pyplot()
    fig, (ax_map, ax_cols) = plt.subplots(1, 2, figsize=(11, 4))
    image = ax_map.imshow(pe_LxD, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    ax_map.set(xlabel="encoding dimension", ylabel="position",
               title="Sinusoidal positional encoding")
    fig.colorbar(image, ax=ax_map)
    for col in (6, 7, 8, 9):
        if col < pe_LxD.shape[1]:
            ax_cols.plot(pe_LxD[:, col], label=f"col {col}")
    ax_cols.set(xlabel="position", title="Columns 6 to 9")
    ax_cols.legend()
    fig.tight_layout()
    plotting.save(fig, path)


def _plot_weights(weights_NxHxLxL, text, step, path):
    plt = plotting.pyplot()
    layers, heads, L, _ = weights_NxHxLxL.shape
    fig, axes = plt.subplots(layers, heads, figsize=(3 * heads, 3 * layers), squeeze=False)
    ticks = range(0, L, max(1, L // 16))
    for i in range(layers):
        for h in range(heads):
            ax = axes[i, h]
            ax.imshow(weights_NxHxLxL[i, h], cmap="Reds", vmin=0, vmax=1)
            ax.set_title(f"layer {i + 1}, head {h + 1}", fontsize=9)
            ax.set_xticks(ticks, [repr(text[t])[1:-1] for t in ticks], fontsize=6)
            ax.set_yticks(ticks, [repr(text[t])[1:-1] for t in ticks], fontsize=6)
    fig.suptitle(f"Attention weights (query rows, key columns), step {step}: {text[:60]!r}",
                 fontsize=10)
    fig.tight_layout()
    plotting.save(fig, path)
