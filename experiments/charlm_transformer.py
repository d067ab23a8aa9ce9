r"""Character-level decoder-only Transformer on The Time Machine, beside the recurrent char LM.

    python launch.py --config experiments/charlm_transformer.py --workdir runs/tlm
    python launch.py --config experiments/charlm_transformer.py:attention=local,context=2048 \
        --workdir runs/tlm_local2048
    python launch.py --config experiments/charlm_transformer.py --workdir runs/tlm --mode sample

Arguments after the colon: `attention=full|local`, `context=N` (the training window and the
longest sequence the model reads), `position=sinusoidal|learned|rotary`, `tiny` (seconds, for
tests). Local attention splits each window into blocks of `model.block_size` and lets every
block see itself and `model.look_back` blocks before it, so a 2048-character context costs
O(2048 * 256) per layer instead of O(2048^2).
Expected result: see the README's results table.
"""

import ml_collections

from seqjax.config import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, attention="full", context=256, position="rotary", tiny=False)
    config = ml_collections.ConfigDict()
    config.task = "charlm_transformer"
    config.seed = 0
    config.num_devices = 0  # 0: every local device
    config.parallel = "pmap"  # or "shard_map": jit(shard_map) over a mesh with one axis, "batch"

    # --- data: as experiments/charlm.py, but random windows of `context` characters -----------
    config.data = dict(
        path=ml_collections.config_dict.placeholder(str),  # None: the shipped Time Machine
        preprocess="letters",
        min_freq=0,
        valid_fraction=0.1,
        partition="random",
        batch_size=16,
        num_steps=args.context,
        eval_batch_size=16,
    )

    # --- model --------------------------------------------------------------------------------
    config.model = dict(
        num_layers=4,
        d_model=128,
        num_heads=4,
        ffn_hiddens=512,
        # 'rotary' (Su et al. 2021), 'sinusoidal' (the textbook's) or 'learned'. On this task
        # rotary learns much faster: a 2-layer model of width 64 at context 64, 300 steps, reaches
        # validation perplexity 5.84 with rotary and 7.78 with sinusoidal encodings added.
        position=args.position,
        attention=args.attention,
        block_size=128,  # local attention: positions per block
        look_back=1,  # local attention: earlier blocks each block also sees
        look_ahead=0,  # later blocks: none, the model is causal
        dropout=0.2,  # on embeddings and each sublayer's output
        # on the attention weights: [B, H, L, L] random bits per layer, the slowest part of a
        # CPU step at L = 256, for little gain here
        attention_dropout=0.0,
        norm="pre",  # 'post': Add&Norm as in the original Transformer
        activation="gelu",  # GELU's tanh approximation; 'gelu_exact' (erf) or 'relu'
        norm_epsilon=1e-6,  # LayerNorm's
        dtype="float32",  # computation; 'bfloat16' keeps params, softmax, norms, logits float32
        param_dtype="float32",
        remat="none",  # 'block' or 'full': recompute each layer's activations in the backward pass
        attention_impl="auto",  # full attention: 'seqjax', 'xla', 'cudnn'; 'auto': cuDNN on GPUs
    )

    # --- optimizer ----------------------------------------------------------------------------
    config.opt = dict(
        name="adamw", lr=1e-3, b1=0.9, b2=0.98, momentum=0.0, weight_decay=0.01,
        schedule="cosine", warmup_steps=100, final_lr_fraction=0.05,
        clip_norm=1.0, grad_accum_steps=1, decay_biases_and_norms=False,
    )

    # --- train, eval and checkpoints ----------------------------------------------------------
    config.num_train_steps = 1500
    config.log_every = 50
    config.eval_every = 100
    config.checkpoint_every = 250
    config.keep_checkpoints = 2
    # patience in evaluations without a better validation loss; target 'metric>=value': 0 / '' off
    config.early_stopping = dict(patience=0, target="")

    config.sample = dict(prefix="time traveller", length=200, temperature=0.7)

    if args.context > 256:  # the same number of characters per batch
        config.data.batch_size = max(1, 16 * 256 // args.context)
    if args.tiny:
        config.data.batch_size = 8
        config.data.num_steps = 32
        config.data.eval_batch_size = 8
        config.model.update(num_layers=1, d_model=16, num_heads=2, ffn_hiddens=32, block_size=8,
                            dropout=0.0, attention_dropout=0.0)
        config.opt.warmup_steps = 2
        config.num_train_steps = 20
        config.log_every = 5
        config.eval_every = 10
        config.checkpoint_every = 10
        config.sample.length = 16
    config.lock()
    return config


def get_sweep():
    """Full vs local attention at context 256:

        python launch.py --config experiments/charlm_transformer.py --sweep \
            --workdir runs/tlm_attn
    """
    return [{"model.attention": kind} for kind in ("full", "local")]
