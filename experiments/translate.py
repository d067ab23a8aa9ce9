r"""English to French translation (the textbook's chapter on machine translation) on the
shipped Tatoeba pairs: a Transformer encoder-decoder, or a GRU encoder-decoder with additive
(Bahdanau) attention.

    python launch.py --config experiments/translate.py --workdir runs/translate
    python launch.py --config experiments/translate.py:model=seq2seq_attention \
        --workdir runs/seq2seq
    python launch.py --config experiments/translate.py --workdir runs/translate --mode translate \
        --text "he is calm ."
    python launch.py --config experiments/translate.py --workdir runs/translate --mode translate \
        --input_file sentences.txt --beam_size 4
    python launch.py --config experiments/translate.py --workdir runs/translate --mode eval

Arguments after the colon: `model=transformer|seq2seq_attention`, `tiny` (seconds, for tests).
Training reports the validation loss and, every `eval_every` steps, greedy BLEU on
`decode.val_sentences` validation pairs; at the end (and in `--mode eval`) greedy and beam
BLEU on the held-out test pairs (sacrebleu), and PNG maps of the cross-attention weights of
`decode.num_attention_maps` test sentences in the workdir.
Expected result: see the README's results table.
"""

import ml_collections

from seqjax.config import parse_arg

MODELS = ("transformer", "seq2seq_attention")


def get_config(arg=None):
    args = parse_arg(arg, model="transformer", tiny=False)
    if args.model not in MODELS:
        raise ValueError(f"model={args.model!r}: expected one of {MODELS}")
    config = ml_collections.ConfigDict()
    config.task = "translate"
    config.seed = 0
    config.num_devices = 0  # 0: every local device
    config.parallel = "pmap"  # or "shard_map": jit(shard_map) over a mesh with one axis, "batch"

    # --- data ---------------------------------------------------------------------------------
    config.data = dict(
        # None: the shipped English-French pairs; else any file of `source<TAB>target` lines
        path=ml_collections.config_dict.placeholder(str),
        max_pairs=ml_collections.config_dict.placeholder(int),  # None: every pair
        # a directory of training rows that `--mode prepare` wrote from pair files of any size,
        # streamed instead of path's training split (path still gives the vocabularies,
        # validation and test); None: in memory
        shard_dir=ml_collections.config_dict.placeholder(str),
        num_valid=2000,
        num_test=2000,  # pairs whose source never occurs in training
        tokenizer="word",  # 'word' (the textbook's), or subwords: 'bpe' or 'wordpiece'
        min_freq=2,  # word: rarer words map to <unk>
        vocab_size=8000,  # the most ids of each vocabulary (word: the most frequent words)
        num_steps=16,  # tokens per sentence (with <eos>); longer ones are truncated
        # Several pairs a training row of num_steps tokens (Transformer only), attention kept
        # within a pair; batch_size then counts rows. Evaluation and decoding stay unpacked.
        pack=False,
        batch_size=256,
        eval_batch_size=512,
    )

    # --- model --------------------------------------------------------------------------------
    config.model = dict(
        name=args.model,
        dtype="float32",  # computation; 'bfloat16' keeps params, softmax, norms, logits float32
        param_dtype="float32",
        remat="none",  # 'block' or 'full': recompute each layer's activations in the backward pass
        attention_impl="auto",  # full attention: 'seqjax', 'xla', 'cudnn'; 'auto': cuDNN on GPUs
        dropout=0.1,
        # transformer
        num_layers=2,
        d_model=128,
        num_heads=4,
        ffn_hiddens=512,
        position="sinusoidal",  # or 'learned' / 'rotary'
        attention="full",  # or 'local' (block_size, look_back) for long sentences
        block_size=8,
        look_back=1,
        look_ahead=0,  # the encoder's local attention: later blocks it also sees
        attention_dropout=0.0,
        norm="post",  # Add&Norm after each sublayer, as in the original; or 'pre'
        activation="relu",  # or 'gelu' (tanh approximation), 'gelu_exact' (erf)
        norm_epsilon=1e-6,  # LayerNorm's
        # seq2seq_attention (num_layers too)
        cell="gru",
        bidirectional=False,  # Bahdanau et al.'s encoder: both directions; s_0 from the backward
        embed_dim=256,
        hidden=256,
    )

    # --- search and evaluation ----------------------------------------------------------------
    config.decode = dict(
        beam_size=4,
        length_penalty=0.6,  # GNMT's alpha: score / ((5 + length) / 6) ** alpha
        val_sentences=500,  # greedy BLEU on this many validation pairs at each evaluation
        num_attention_maps=3,
        # hand-aligned pairs scored at the end (test_alignment): None the 30 shipped ones, '' off
        alignment_file=ml_collections.config_dict.placeholder(str),
    )

    # --- optimizer ----------------------------------------------------------------------------
    config.opt = dict(
        name="adamw", lr=2e-3, b1=0.9, b2=0.98, momentum=0.0, weight_decay=0.01,
        schedule="cosine", warmup_steps=200, final_lr_fraction=0.02,
        clip_norm=1.0, grad_accum_steps=1, decay_biases_and_norms=False,
    )

    # --- train, eval and checkpoints ----------------------------------------------------------
    # About 25 minutes of training on 2 CPU cores, evaluation included, for either model.
    config.num_train_steps = 1200
    config.log_every = 50
    config.eval_every = 300
    config.checkpoint_every = 300
    config.keep_checkpoints = 2
    # patience in evaluations without a better validation loss; target 'metric>=value': 0 / '' off
    config.early_stopping = dict(patience=0, target="")

    if args.model == "seq2seq_attention":
        # The best GRU point of experiments/translate_compare.py's sweep, whose results the README
        # quotes (tests/test_translate_compare.py checks they agree; a step costs 1.29x
        # the Transformer's, so 850 steps fill the 25 minutes).
        config.model.dropout = 0.1
        config.opt.update(lr=1e-2, warmup_steps=100)
        config.num_train_steps = 850
        config.eval_every = config.checkpoint_every = 100
    if args.tiny:
        config.data.update(max_pairs=3000, num_valid=50, num_test=50, batch_size=16,
                           eval_batch_size=24, num_steps=8)
        config.model.update(num_layers=1, d_model=16, num_heads=2, ffn_hiddens=32,
                            embed_dim=16, hidden=16, dropout=0.0)
        config.decode.update(beam_size=2, val_sentences=20, num_attention_maps=1)
        config.opt.update(lr=2e-3, warmup_steps=2)  # for either model
        config.num_train_steps = 10
        config.log_every = 5
        config.eval_every = 10
        config.checkpoint_every = 5
    config.lock()
    return config


def get_sweep():
    """Both models with the same data and budget:
    `python launch.py --config experiments/translate.py --sweep --workdir runs/translate_models`."""
    return [{"model.name": name} for name in MODELS]
