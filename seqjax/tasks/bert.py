"""BERT pretraining with masked language modelling (and next-sentence prediction) on WikiText,
and what fine-tuning shares with it (the encoder, the tokenizer, the model section of the config;
fine-tuning itself: `seqjax.tasks.bert_finetune`).

Pretraining draws a fresh mask for every batch inside the compiled step, from the step's key
(`masking.mask_tokens`: 15% of the ordinary tokens, at most `data.max_predictions` per
sequence; 80% [MASK], 10% random, 10% kept); validation uses one fixed draw, so its numbers
are comparable across evaluations. The MLM head runs on the chosen positions only. The loss is
the mean cross-entropy over chosen positions plus, with NSP, the mean NSP cross-entropy over
sequences.

With `data.pack`, training rows hold up to `data.pack_max_sequences` sequences each
(`data_lib.pack_pretraining`), kept apart by pack ids in attention. Each packed sequence draws
its mask as it would alone (its own 15% and `data.max_predictions` cap), so the MLM budget is
per packed sequence, and the head runs on `packed_predictions(config)` positions a row; NSP
runs on each packed sequence's [CLS]. Validation reads one sequence a row as before.

The WordPiece tokenizer is trained on the pretraining corpus and saved in the workdir
(`tokenizer.json`); fine-tuning with `config.init_from` reads the pretraining run's, and from
scratch (`init_from=None`) trains the same one, so the two differ only in their weights.

Dimension letters: B batch, L max_seq_len, P max_predictions, V vocabulary.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax import config as config_lib
from seqjax.data import masking
from seqjax.data import pretraining as data_lib
from seqjax.data.batching import padded_batches
from seqjax.nn.bert import BERT_SIZES, BertEncoder, BertPretraining
from seqjax.tasks import shards
from seqjax.tasks.common import (
    Task,
    accuracy_sum,
    check_training_rows,
    pack_align,
    perplexity,
    saved_file,
    transformer_config,
)

TOKENIZER_FILE = "tokenizer.json"


# What the released BERT checkpoints compute (Devlin et al.'s code, Hugging Face's BertModel).
PUBLISHED = dict(norm="post", activation="gelu_exact", norm_epsilon=1e-12)


def model_config(size: str, published: bool = False) -> dict:
    """The `model` section of a BERT experiment of one of `BERT_SIZES`; `published`: computing
    what the released checkpoints compute (`PUBLISHED`), for fine-tuning an imported one."""
    if size not in BERT_SIZES:
        raise ValueError(f"size={size!r}: expected one of {sorted(BERT_SIZES)}")
    num_layers, d_model, num_heads = BERT_SIZES[size]
    model = dict(size=size, num_layers=num_layers, d_model=d_model, num_heads=num_heads,
                 ffn_hiddens=4 * d_model, max_position=512, num_segments=2, norm="post",
                 activation="gelu", norm_epsilon=1e-6, attention="full", block_size=64,
                 look_back=1, look_ahead=1, dropout=0.1, attention_dropout=0.1, dtype="float32",
                 param_dtype="float32", remat="none", attention_impl="auto")
    return dict(model, **PUBLISHED) if published else model


def _encoder_config(config):
    return transformer_config(config, max_length_key="model.max_position", position="learned")


def check_model(config):
    _encoder_config(config)
    config_lib.expect_positive_int(config, "data.batch_size", "data.eval_batch_size",
                                   "data.vocab_size", "data.max_seq_len", "model.num_segments")
    config_lib.expect(config.data.max_seq_len <= config.model.max_position, "data.max_seq_len",
                      config.data.max_seq_len, f"is longer than the position table "
                      f"(model.max_position={config.model.max_position})")
    specials = len(data_lib.SPECIAL_TOKENS)
    config_lib.expect(config.data.vocab_size > specials, "data.vocab_size",
                      config.data.vocab_size, f"must exceed the {specials} special tokens")


def make_encoder(config, vocab_size: int) -> BertEncoder:
    return BertEncoder(vocab_size, num_segments=config.model.num_segments,
                       **_encoder_config(config).kwargs("position"))


def named_tokenizer(config, workdir, train_documents=None, shard_dir=None):
    """(tokenizer, where it comes from): the workdir's saved tokenizer; else, when
    fine-tuning, the one of `config.init_from`; else that of the pretraining shards in
    `shard_dir`; else one trained on the pretraining corpus' training split."""
    text, name = saved_file(workdir, TOKENIZER_FILE), f"the {TOKENIZER_FILE} of {workdir}"
    if text is None and config.get("init_from"):
        config_lib.expect_run_dir(config, "init_from")
        text, name = saved_file(config.init_from, TOKENIZER_FILE), \
            f"the {TOKENIZER_FILE} of {config.init_from}"
        if text is None:
            raise FileNotFoundError(f"config.init_from={config.init_from!r} holds no "
                                    f"{TOKENIZER_FILE}: not a BERT pretraining workdir")
    if text is None and shard_dir is not None:
        saved = shards.shard_tokenizers(shard_dir, [TOKENIZER_FILE])
        text, name = saved[TOKENIZER_FILE] if saved else (None, None)
    if text is not None:
        return data_lib.tokenizer_from_json(text, name), name
    # Fine-tuning names its tokenizer's corpus; pretraining trains it on its training split.
    path = config.data.get("tokenizer_corpus", config.data.get("train_file"))
    if train_documents is None:
        train_documents = data_lib.load_wikitext("train", path, config.data.max_documents)
    corpus = repr(path) if path else "the shipped WikiText-2 train split"
    return (data_lib.train_tokenizer([s for doc in train_documents for s in doc],
                                     config.data.vocab_size),
            f"a WordPiece tokenizer trained on {corpus} (vocab_size={config.data.vocab_size})")


def model_inputs(batch):
    """The model's inputs of a batch: segments and the padding mask from the valid lengths
    (none for packed rows, whose pack id 0 marks padding)."""
    if "pack_ids" in batch:
        return batch["segments"], None
    L = batch["tokens"].shape[1]
    return batch["segments"], jnp.arange(L)[None, :] < batch["valid_len"][:, None]


# The model's keyword inputs of packed rows (`data_lib.pack_pretraining`), by batch key.
_PACKED_INPUTS = {"pack_ids": "pack_ids_BxL", "position_ids": "position_ids_BxL",
                  "cls_positions": "cls_positions_BxM"}


# ---------------------------------------------------------------------------------------------
# Pretraining.
# ---------------------------------------------------------------------------------------------

def check_pretrain(config):
    if check_training_rows(config):
        config_lib.expect_positive_int(config, "data.pack_max_sequences")
    check_model(config)
    d = config.data
    config_lib.expect_positive_int(config, "data.max_predictions", "data.dupe_factor")
    config_lib.expect_fraction(config, "data.mask_prob", low_open=True)
    config_lib.expect_fraction(config, "data.mask_token_prob")
    config_lib.expect_fraction(config, "data.random_token_prob")
    config_lib.expect(d.mask_token_prob + d.random_token_prob <= 1, "data.random_token_prob",
                      d.random_token_prob, "plus data.mask_token_prob must be <= 1")
    config_lib.expect_type(config, "data.nsp", bool)
    config_lib.expect_type(config, "data.whole_word", bool)
    for key in ("num_valid", "max_documents"):
        if d[key] is not None:
            config_lib.expect_positive_int(config, f"data.{key}")


def packed_predictions(config) -> int:
    """The most positions the mask chooses in a packed row: each of its M sequences of n
    ordinary tokens chooses at most max(round(p n), 1) <= p n + 1 of them (p = mask_prob), and
    at most max_predictions, so a row of L tokens at most p L + M in all."""
    d = config.data
    M, L = d.pack_max_sequences, d.max_seq_len
    return min(M * d.max_predictions, math.ceil(d.mask_prob * L) + M, L)


def pretraining_loss(model: BertPretraining, params, batch, carry=(), *, rng=None, train=False,
                     draw_mask, max_predictions: int, packed_predictions: int | None = None):
    """Summed MLM cross-entropy over the chosen positions (and with NSP, its loss per sequence
    scaled so that loss / weight is their sum of means). Training draws the mask from `rng`
    (`draw_mask(rng, tokens) -> (inputs, targets, weights)`, and `draw_mask(rng, tokens,
    pack_ids)` for packed rows); evaluation reads the batch's fixed draw. `row_weight` 0 marks
    padding rows of an evaluation batch. A packed batch (`data_lib.pack_pretraining`) has NSP
    labels and weights per packed sequence [B, M], and at most `packed_predictions` chosen
    positions a row (`max_predictions` bounds those of an unpacked row)."""
    row_weight_B = batch.get("row_weight", jnp.ones(batch["tokens"].shape[0]))
    packed = "pack_ids" in batch
    if train:
        mask_rng, rng = jax.random.split(rng)
        pack_ids = (batch["pack_ids"],) if packed else ()
        inputs, targets, weights = draw_mask(mask_rng, batch["tokens"], *pack_ids)
    else:
        inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
        weights = weights * row_weight_B[:, None]
    # Chosen positions first: a row has at most P of them, so all of them are among these.
    P = packed_predictions if packed else max_predictions
    positions_BxP = jax.lax.top_k(weights, P)[1]
    targets_BxP = jnp.take_along_axis(targets, positions_BxP, 1)
    weights_BxP = jnp.take_along_axis(weights, positions_BxP, 1)
    mlm_logits, nsp_logits = model.apply(
        params, inputs, *model_inputs(batch), positions_BxP, deterministic=not train,
        rngs={"dropout": rng} if train else {},
        **{name: batch[key] for key, name in _PACKED_INPUTS.items() if key in batch})
    ce_BxP = optax.softmax_cross_entropy_with_integer_labels(mlm_logits, targets_BxP)
    sums = dict(loss=jnp.sum(ce_BxP * weights_BxP), weight=jnp.sum(weights_BxP),
                mlm_accuracy=accuracy_sum(mlm_logits, targets_BxP, weights_BxP))
    sums["mlm_loss"] = sums["loss"]
    if model.nsp:  # one label per row, or per packed sequence: [B] or [B, M]
        labels = batch["nsp_label"]
        sequence_weights = batch["nsp_weight"] if packed else row_weight_B
        nsp_ce = optax.softmax_cross_entropy_with_integer_labels(nsp_logits, labels)
        sums.update(nsp_loss=jnp.sum(nsp_ce * sequence_weights),
                    nsp_accuracy=accuracy_sum(nsp_logits, labels, sequence_weights),
                    sequences=jnp.sum(sequence_weights))
        # loss / weight = mean MLM loss per chosen token + mean NSP loss per sequence.
        per_sequence = jax.lax.stop_gradient(sums["weight"] / jnp.maximum(sums["sequences"], 1))
        sums["loss"] = sums["loss"] + per_sequence * sums["nsp_loss"]
    return sums, carry


def pretraining_report(means):
    if "mlm_loss" not in means:  # the best validation loss alone
        return means
    return dict(means, mlm_perplexity=perplexity(means["mlm_loss"]))


def train_rows(config, tokenizer, documents, seed=None) -> dict:
    """The training rows of `documents` (a corpus, or a chunk of one): `pretraining_arrays`,
    packed when `config.data.pack` (`data_lib.pack_pretraining`; with block-local attention
    each sequence starts at a block boundary, so that it sees the windows it sees alone)."""
    d = config.data
    rows = data_lib.pretraining_arrays(data_lib.encode_documents(tokenizer, documents),
                                       d.max_seq_len, nsp=d.nsp,
                                       seed=config.seed if seed is None else seed,
                                       dupe_factor=d.dupe_factor,
                                       special=data_lib.special_ids(tokenizer))
    if not d.pack:
        return rows
    return data_lib.pack_pretraining(rows, d.pack_max_sequences, pack_align(config))


def prepare_rows(config, workdir, sources):
    """({file name: (JSON, where it comes from)} of the run's tokenizer, the training rows of
    the text files `sources` a block of articles at a time, each block seeded by its index)."""
    check_pretrain(config)
    tokenizer, name = named_tokenizer(config, workdir)
    rows = (train_rows(config, tokenizer, documents, seed=(config.seed, i))
            for i, documents in enumerate(shards.document_blocks(sources)))
    return {TOKENIZER_FILE: (tokenizer.to_str(), name)}, rows


def build_pretrain(config, workdir=None) -> Task:
    check_pretrain(config)
    d = config.data
    streamed = d.get("shard_dir") is not None
    train_docs = None if streamed else data_lib.load_wikitext("train", d.train_file,
                                                              d.max_documents)
    valid_docs = data_lib.load_wikitext("valid", d.valid_file, d.max_documents)
    tokenizer, tokenizer_name = named_tokenizer(config, workdir, train_docs, d.get("shard_dir"))
    tokenizers = {TOKENIZER_FILE: (tokenizer.to_str(), tokenizer_name)}
    train = shards.train_batches(config, tokenizers,
                                 lambda: train_rows(config, tokenizer, train_docs), "sequences")
    V = tokenizer.get_vocab_size()
    special = data_lib.special_ids(tokenizer)
    valid = data_lib.pretraining_arrays(data_lib.encode_documents(tokenizer, valid_docs),
                                        d.max_seq_len, nsp=d.nsp, seed=config.seed + 1,
                                        special=special)
    valid = {k: v[:d.num_valid] for k, v in valid.items()}
    continuation = jnp.asarray(data_lib.continuation_table(tokenizer))
    mask = functools.partial(masking.mask_tokens, vocab_size=V, mask_id=special.mask,
                             special_ids=tuple(special), mask_prob=d.mask_prob,
                             mask_token_prob=d.mask_token_prob,
                             random_token_prob=d.random_token_prob,
                             max_predictions=d.max_predictions,
                             max_sequences=d.pack_max_sequences if d.pack else None)

    def draw_mask(rng, tokens, pack_ids=None):
        word_starts = ~continuation[tokens] if d.whole_word else None
        return mask(rng, tokens, word_starts=word_starts, pack_ids=pack_ids)

    # Validation: one fixed draw of the mask.
    fixed = jax.jit(draw_mask)(jax.random.PRNGKey(config.seed), valid["tokens"])
    valid.update(zip(("inputs", "targets", "weights"), map(np.asarray, fixed)))
    model = BertPretraining(make_encoder(config, V), nsp=d.nsp)

    def init_params(rng):
        tokens = jnp.zeros((1, d.max_seq_len), jnp.int32)
        return model.init(rng, tokens, tokens, tokens > 0, tokens[:, :d.max_predictions])

    return Task(init_params=init_params,
                loss=functools.partial(pretraining_loss, model, draw_mask=draw_mask,
                                       max_predictions=d.max_predictions,
                                       packed_predictions=packed_predictions(config)
                                       if d.pack else None),
                train_batch=train,
                eval_batches=padded_batches(valid, d.eval_batch_size, what="validation sequences"),
                batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
                tokens_per_batch=d.batch_size * d.max_seq_len, report=pretraining_report,
                denominators=dict(nsp_loss="sequences", nsp_accuracy="sequences") if d.nsp else {},
                files=shards.texts(tokenizers))
