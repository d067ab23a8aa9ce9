r"""Fine-tuning BERT on SST-2 (shipped; binary sentiment) from a pretraining run's encoder, or
from scratch as the control.

    python launch.py --config experiments/bert_finetune.py --workdir runs/sst2 \
        --config.init_from=runs/bert
    python launch.py --config experiments/bert_finetune.py --workdir runs/sst2_scratch

`config.init_from` names a pretraining workdir: the encoder's parameters (and the pooler's, if
it was pretrained with NSP) and its tokenizer are loaded from its latest checkpoint; the
classifier head is new, and neither the optimizer state nor the MLM head is read. Without it
the same model starts from random weights with the same tokenizer. The model section must
match the pretraining run's (`:size=` as there); a mismatch is an error naming the key.
Arguments after the colon: `size=tiny|mini|small|medium|base` (default tiny), `published` (the
released checkpoints' post-norm, exact GELU and LayerNorm epsilon, for a workdir made by
`--mode import`: README, "Fine-tuning a published BERT"), `smoke` (seconds, for tests).
Reports dev accuracy.
"""

import ml_collections

from seqjax.config import parse_arg
from seqjax.tasks.bert import model_config


def get_config(arg=None):
    args = parse_arg(arg, size="tiny", published=False, smoke=False)
    placeholder = ml_collections.config_dict.placeholder
    config = ml_collections.ConfigDict()
    config.task = "bert_finetune"
    config.seed = 0
    config.num_devices = 0  # 0: every local device
    config.parallel = "pmap"  # or "shard_map": jit(shard_map) over a mesh with one axis, "batch"
    config.init_from = placeholder(str)  # a pretraining workdir; None: from scratch
    # its checkpoint of this step; None: the latest; 0: untrained, with init_from's tokenizer
    config.init_from_step = placeholder(int)

    config.data = dict(
        # None: the shipped SST-2 splits; else GLUE-style `sentence<TAB>label` files with a header
        train_file=placeholder(str),
        valid_file=placeholder(str),
        max_examples=placeholder(int),  # None: every training sentence
        num_classes=2,
        max_seq_len=64,
        batch_size=32,
        eval_batch_size=128,
        # From scratch only: the WordPiece tokenizer is trained as pretraining trains it
        tokenizer_corpus=placeholder(str),  # None: the shipped WikiText-2 training split
        max_documents=placeholder(int),
        vocab_size=8000,
    )
    config.model = model_config(args.size, args.published)
    if not args.published:
        config.model.norm = "pre"  # as experiments/bert_pretrain.py: the encoder loaded must match
    config.model.classifier_dropout = 0.1
    # a linear probe: the encoder and pooler as loaded, only the classifier trained
    config.model.freeze_encoder = False

    config.opt = dict(
        name="adamw", lr=3e-4, b1=0.9, b2=0.999, momentum=0.0, weight_decay=0.01,
        schedule="linear", warmup_steps=200, final_lr_fraction=0.0,
        clip_norm=1.0, grad_accum_steps=1, decay_biases_and_norms=False,
    )

    config.num_train_steps = 2000
    config.log_every = 50
    config.eval_every = 250
    config.checkpoint_every = 500
    config.keep_checkpoints = 1
    # patience in evaluations without a better validation loss; target 'metric>=value': 0 / '' off
    config.early_stopping = dict(patience=0, target="")

    if args.smoke:
        config.data.update(vocab_size=200, max_seq_len=32, max_examples=200, max_documents=6,
                           batch_size=8, eval_batch_size=128)
        config.model.update(num_layers=1, d_model=16, num_heads=2, ffn_hiddens=32,
                            max_position=32)
        config.opt.warmup_steps = 2
        config.num_train_steps = 6
        config.log_every = 3
        config.eval_every = 6
        config.checkpoint_every = 3
    config.lock()
    return config
