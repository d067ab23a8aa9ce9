r"""BERT pretraining on WikiText-2 (shipped): masked language modelling with dynamic masking,
and next-sentence prediction.

    python launch.py --config experiments/bert_pretrain.py --workdir runs/bert
    python launch.py --config experiments/bert_pretrain.py:size=mini --workdir runs/bert_mini
    python launch.py --config experiments/bert_pretrain.py --workdir runs/bert --mode eval
    python launch.py --config experiments/bert_pretrain.py --workdir runs/bert_local \
        --config.model.attention=local --config.model.block_size=64

Arguments after the colon: `size=tiny|mini|small|medium|base` (the published BERT shapes;
default tiny), `curve` (the 18,000-step run that keeps the checkpoints experiments/
bert_transfer.py fine-tunes), `smoke` (seconds, for tests). Reports held-out MLM loss,
accuracy and perplexity and NSP accuracy. Fine-tune the result with experiments/bert_finetune.py.
Expected result: see the README's results table.
"""

import ml_collections

from seqjax.analysis import transfer_curve
from seqjax.config import parse_arg
from seqjax.tasks.bert import model_config


def get_config(arg=None):
    args = parse_arg(arg, size="tiny", curve=False, smoke=False)
    config = ml_collections.ConfigDict()
    config.task = "bert_pretrain"
    config.seed = 0
    config.num_devices = 0  # 0: every local device
    config.parallel = "pmap"  # or "shard_map": jit(shard_map) over a mesh with one axis, "batch"

    # --- data ---------------------------------------------------------------------------------
    placeholder = ml_collections.config_dict.placeholder
    config.data = dict(
        # None: the shipped WikiText-2 splits; else files in WikiText's layout (plain or .gz)
        train_file=placeholder(str),
        valid_file=placeholder(str),
        max_documents=placeholder(int),  # None: every article of each split
        # a directory of training rows that `--mode prepare` wrote from text files of any size,
        # streamed instead of train_file (README: "Your own large corpus"); None: in memory
        shard_dir=placeholder(str),
        num_valid=placeholder(int),  # None: every validation sequence
        vocab_size=8000,  # WordPiece vocabulary, trained on the training split
        max_seq_len=64,
        nsp=True,  # [CLS] A [SEP] B [SEP] pairs with next-sentence labels; else [CLS] A [SEP]
        dupe_factor=2,  # passes over the corpus with different random cuts into sequences
        mask_prob=0.15,
        mask_token_prob=0.8,
        random_token_prob=0.1,
        max_predictions=10,  # 15% of 64, rounded up
        whole_word=False,  # mask whole words rather than WordPiece pieces
        # Several sequences a training row, attention kept within each; every packed sequence
        # draws its own mask and NSP label. Validation stays unpacked. (WikiText's sequences
        # fill their rows already: packing removes little padding here.)
        pack=False,
        pack_max_sequences=4,  # with pack: the most sequences (NSP slots) in a row
        batch_size=64,
        eval_batch_size=128,
    )
    config.model = model_config(args.size)
    # Pre-norm: in 6,000 steps it reaches a held-out MLM accuracy of 0.22, where post-norm
    # (the original BERT's) was still at 0.14 after 3,000 steps of twice the length.
    config.model.norm = "pre"

    # --- optimizer ----------------------------------------------------------------------------
    config.opt = dict(
        name="adamw", lr=1e-3, b1=0.9, b2=0.98, momentum=0.0, weight_decay=0.01,
        schedule="linear", warmup_steps=500, final_lr_fraction=0.0,
        clip_norm=1.0, grad_accum_steps=1, decay_biases_and_norms=False,
    )

    # --- train, eval and checkpoints ----------------------------------------------------------
    config.num_train_steps = 6000
    config.log_every = 50
    config.eval_every = 1000
    config.checkpoint_every = 1000
    config.keep_checkpoints = 2
    config.keep_steps = ()  # steps whose checkpoints are also kept (for init_from_step)
    # patience in evaluations without a better validation loss; target 'metric>=value': 0 / '' off
    config.early_stopping = dict(patience=0, target="")

    if args.curve:  # the pretraining run of experiments/bert_transfer.py
        config.num_train_steps = transfer_curve.PRETRAIN_STEPS[-1]
        config.keep_steps = transfer_curve.PRETRAIN_STEPS[1:-1]
        config.eval_every = config.checkpoint_every = 1500
    if args.smoke:
        config.data.update(vocab_size=200, max_seq_len=32, max_predictions=5, num_valid=16,
                           dupe_factor=1, batch_size=8, eval_batch_size=8, max_documents=6)
        config.model.update(num_layers=1, d_model=16, num_heads=2, ffn_hiddens=32,
                            max_position=32)
        config.opt.warmup_steps = 2
        config.num_train_steps = 6
        config.log_every = 3
        config.eval_every = 6
        config.checkpoint_every = 3
    config.lock()
    return config

