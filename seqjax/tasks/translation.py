"""Machine translation: an encoder-decoder (Transformer, or GRU with additive attention)
trained with teacher forcing on sentence pairs, decoded greedily or with beam search, and
scored with corpus BLEU (sacrebleu) on held-out pairs.

The textbook's pipeline: preprocessed, lowercased sentences split into words (or subwords),
source and target vocabularies built from the training pairs and saved in the workdir, each
sentence truncated or padded to `num_steps` tokens with `<eos>` and its valid length. The
decoder reads `<bos>` plus the target shifted right and predicts the target; padded target
positions carry no loss, and padded source positions are masked out of every attention.

With `data.pack`, training rows hold several pairs each (`data_lib.pack_pairs`; Transformer
only): attention stays within a pair, the loss is the same sum over target tokens, so a pair
costs the same loss and gradient as unpacked, and the batch size counts rows. Evaluation,
BLEU and decoding read one pair a row as before.

Input to `translate`: a sentence longer than `num_steps - 1` tokens is truncated with a
warning (the model never saw longer sources); an empty sentence or one whose words are all
unknown to the source vocabulary is a ValueError naming it.

Dimension letters: B batch, K beam, S source length, T target length, V vocabulary.
"""

import functools
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu

from seqjax import config as config_lib
from seqjax import decoding, files, plotting
from seqjax.data import translation as data_lib
from seqjax.nn.recurrent import CELLS
from seqjax.nn.seq2seq import Seq2SeqAttentionDecoder, Seq2SeqEncoder
from seqjax.nn.transformer import EncoderDecoder, TransformerDecoder, TransformerEncoder
from seqjax.tasks import cross_attention, shards
from seqjax.tasks.common import (
    Task,
    accuracy_sum,
    check_precision,
    check_training_rows,
    lm_sums,
    pack_align,
    precision,
    saved_file,
    transformer_config,
    with_perplexity,
)

MODELS = ("transformer", "seq2seq_attention")
PACKED_KEYS = ("src_segment_ids", "src_positions", "tgt_segment_ids", "tgt_positions")
TOKENIZER_FILES = {"src": "src_tokenizer.json", "tgt": "tgt_tokenizer.json"}


def check_config(config):
    d, m, s = config.data, config.model, config.decode
    config_lib.expect(d.tokenizer in data_lib.TOKENIZER_KINDS, "data.tokenizer", d.tokenizer,
                      f"expected one of {data_lib.TOKENIZER_KINDS}")
    config_lib.expect_positive_int(config, "data.batch_size", "data.eval_batch_size",
                                   "data.vocab_size", "data.num_test", "data.num_valid")
    config_lib.expect(config_lib.expect_type(config, "data.num_steps", int) >= 2,
                      "data.num_steps", d.num_steps, "must be >= 2 (a token and <eos>)")
    config_lib.expect(config_lib.expect_type(config, "data.min_freq", int) >= 0,
                      "data.min_freq", d.min_freq, "must be >= 0")
    if d.max_pairs is not None:
        config_lib.expect_positive_int(config, "data.max_pairs")
    config_lib.expect(m.name in MODELS, "model.name", m.name, f"expected one of {MODELS}")
    if check_training_rows(config):
        config_lib.expect(m.name == "transformer", "data.pack", d.pack,
                          f"packs several pairs a row for model.name='transformer' only (the "
                          f"recurrent encoder-decoder reads one pair a row), not {m.name!r}")
    check_precision(config)
    bidirectional = m.get("bidirectional", False)  # absent from runs saved before it existed
    config_lib.expect(isinstance(bidirectional, bool), "model.bidirectional", bidirectional,
                      "expected True or False")
    if m.name == "transformer":
        config_lib.expect(not bidirectional, "model.bidirectional", bidirectional,
                          "applies to model.name='seq2seq_attention' (Bahdanau et al.'s "
                          "bidirectional recurrent encoder); the Transformer's encoder already "
                          "sees the whole source")
        transformer_config(config, max_length_key="data.num_steps")
    else:
        config_lib.expect_fraction(config, "model.dropout")
        config_lib.expect_positive_int(config, "model.num_layers")
        config_lib.expect(m.attention == "full", "model.attention", m.attention,
                          "the recurrent decoder attends over the whole source at every step "
                          "(additive attention); 'local' applies to the Transformer's "
                          "self-attention")
        config_lib.expect_positive_int(config, "model.embed_dim", "model.hidden")
        config_lib.expect(m.cell in CELLS, "model.cell", m.cell, f"expected one of {sorted(CELLS)}")
    config_lib.expect_positive_int(config, "decode.beam_size", "decode.num_attention_maps")
    config_lib.expect(config_lib.expect_type(config, "decode.val_sentences", int) >= 0,
                      "decode.val_sentences", s.val_sentences, "must be >= 0 (0: no BLEU)")
    if s.get("alignment_file"):
        config_lib.expect_type(config, "decode.alignment_file", str)
        config_lib.expect(d.tokenizer == "word", "data.tokenizer", d.tokenizer,
                          "decode.alignment_file links words: it needs 'word'")
    value = config_lib.expect_type(config, "decode.length_penalty", (int, float))
    config_lib.expect(math.isfinite(value) and value >= 0, "decode.length_penalty", value,
                      "must be a finite number >= 0")


def make_model(config, src_vocab_size: int, tgt_vocab_size: int) -> EncoderDecoder:
    m = config.model
    if m.name == "transformer":
        hp = transformer_config(config, max_length_key="data.num_steps").kwargs()
        return EncoderDecoder(TransformerEncoder(src_vocab_size, **hp),
                              TransformerDecoder(tgt_vocab_size, **hp))
    hp = dict(embed_size=m.embed_dim, num_hiddens=m.hidden, num_layers=m.num_layers,
              cell=m.cell, dropout_rate=m.dropout, **precision(config))
    return EncoderDecoder(Seq2SeqEncoder(src_vocab_size,
                                         bidirectional=m.get("bidirectional", False), **hp),
                          Seq2SeqAttentionDecoder(tgt_vocab_size, **hp))


def loss(model: EncoderDecoder, params, batch, carry=(), *, rng=None, train=False):
    """Summed cross-entropy and accuracy of the teacher-forced target tokens (padding has
    weight 0). A packed batch (`data_lib.pack_pairs`) has segment ids and positions instead
    of source lengths; its sums are the same sums over the same target tokens."""
    packed = {key: batch[key] for key in PACKED_KEYS if key in batch}
    logits_BxTxV = model.apply(params, batch["src"], batch.get("src_valid_len"), batch["tgt_in"],
                               deterministic=not train, rngs={"dropout": rng} if train else {},
                               **packed)
    sums = lm_sums(logits_BxTxV, batch["tgt_out"], batch["weights"])
    sums["accuracy"] = accuracy_sum(logits_BxTxV, batch["tgt_out"], batch["weights"])
    return sums, carry


def _splits(config) -> dict:
    """{'train' | 'valid' | 'test': pairs} of config.data.path."""
    d = config.data
    pairs = data_lib.load_pairs(d.path, max_pairs=d.max_pairs)
    split = data_lib.split_pairs(pairs, num_valid=d.num_valid, num_test=d.num_test,
                                 seed=config.seed)
    return {name: [pairs[i] for i in idx] for name, idx in split.items()}


def named_tokenizers(config, train_pairs, workdir, shard_dir=None) -> dict:
    """{file name: (tokenizer, where it comes from)} of the source and target sides: the
    workdir's saved tokenizers when it has them, so a run always reads text the way its
    checkpoints were trained; else those of the training shards in `shard_dir`; else ones
    trained on the training pairs."""
    d = config.data
    names = [TOKENIZER_FILES[side] for side in ("src", "tgt")]
    saved = [saved_file(workdir, name) for name in names]
    if all(text is not None for text in saved):
        return {name: (data_lib.Tokenizer.from_json(text), f"the {name} of {workdir}")
                for name, text in zip(names, saved)}
    found = shard_dir is not None and shards.shard_tokenizers(shard_dir, names)
    if found:
        return {name: (data_lib.Tokenizer.from_json(text), origin)
                for name, (text, origin) in found.items()}
    corpus = repr(d.path) if d.path else "the shipped English-French pairs"
    return {name: (data_lib.Tokenizer.train([pair[i] for pair in train_pairs],
                                            kind=d.tokenizer, min_freq=d.min_freq,
                                            vocab_size=d.vocab_size),
                   f"a {d.tokenizer} tokenizer trained on the training pairs of {corpus}")
            for i, name in enumerate(names)}


def prepare_rows(config, workdir, sources):
    """({file name: (JSON, where it comes from)} of the run's tokenizers, the training rows of
    the `source<TAB>target` files `sources` a block of lines at a time)."""
    check_config(config)
    named = named_tokenizers(config, _splits(config)["train"], workdir)
    src_tok, tgt_tok = (tok for tok, _ in named.values())
    rows = (train_rows(config, src_tok, tgt_tok, pairs) for pairs in shards.pair_blocks(sources))
    return _jsons(named), rows


def _jsons(named: dict) -> dict:
    """{file name: (JSON, where it comes from)} of `named_tokenizers`."""
    return {name: (tok.to_json(), origin) for name, (tok, origin) in named.items()}


def _arrays(tokenizer, texts, num_steps):
    return data_lib.build_array([tokenizer.encode(text) for text in texts], num_steps)


def train_rows(config, src_tok, tgt_tok, pairs) -> dict:
    """The training rows of `pairs` (a corpus, or a chunk of one), packed when
    `config.data.pack` (`data_lib.pack_pairs`; with block-local attention each sentence starts
    a block), else one pair a row (src, src_len, tgt, tgt_len); `data_lib.teacher_forcing`
    makes a batch of any of their rows."""
    num_steps = config.data.num_steps
    src, src_len = _arrays(src_tok, [p[0] for p in pairs], num_steps)
    tgt, tgt_len = _arrays(tgt_tok, [p[1] for p in pairs], num_steps)
    if config.data.pack:
        return data_lib.pack_pairs(src, src_len, tgt, tgt_len, align=pack_align(config))
    return dict(src=src, src_len=src_len, tgt=tgt, tgt_len=tgt_len)


def build(config, workdir=None) -> Task:
    check_config(config)
    d, s = config.data, config.decode
    splits = _splits(config)
    named = named_tokenizers(config, splits["train"], workdir, d.get("shard_dir"))
    src_tok, tgt_tok = (tok for tok, _ in named.values())
    valid = (*_arrays(src_tok, [p[0] for p in splits["valid"]], d.num_steps),
             *_arrays(tgt_tok, [p[1] for p in splits["valid"]], d.num_steps))
    model = make_model(config, len(src_tok), len(tgt_tok))
    searcher = Searcher(model, d.num_steps, d.eval_batch_size)

    def init_params(rng):
        tokens = jnp.zeros((1, d.num_steps), jnp.int32)
        return model.init(rng, tokens, jnp.ones((1,), jnp.int32), tokens)

    def translate_sentences(params, sentences, *, beam_size=None, length_penalty=None,
                            on_error=None):
        """Target sentences (preprocessed words, or subwords joined) of the source sentences.
        A sentence that cannot be read is a ValueError, or with `on_error`, is passed to
        `on_error(message)` and translated as None."""
        src, src_len, kept = _encode_inputs(src_tok, sentences, d.num_steps, on_error)
        tokens = searcher(params, src, src_len, beam_size or s.beam_size,
                          s.length_penalty if length_penalty is None else length_penalty)
        translations = [None] * len(sentences)
        for i, row in zip(kept, tokens):
            translations[i] = tgt_tok.decode(row)
        return translations

    val_pairs = splits["valid"][:s.val_sentences]
    test_pairs = splits["test"]
    aligned = _aligned_examples(config, splits["train"])

    def decode_eval(params, final: bool) -> dict:
        """Greedy BLEU on validation pairs; at the end, greedy and beam BLEU on the test pairs,
        their translations (`test_translations.tsv`), the attention maps of a few and the
        alignment score of the hand-aligned pairs (`cross_attention.alignment`)."""
        metrics = {}
        if val_pairs:
            greedy = translate_sentences(params, [p[0] for p in val_pairs], beam_size=1)
            metrics["bleu"] = _bleu(val_pairs, greedy)
        if final:
            sources = [p[0] for p in test_pairs]
            greedy = translate_sentences(params, sources, beam_size=1)
            metrics["test_bleu_greedy"] = _bleu(test_pairs, greedy)
            beam = translate_sentences(params, sources)
            metrics[f"test_bleu_beam{s.beam_size}"] = _bleu(test_pairs, beam)
            if aligned:
                scored = cross_attention.alignment(model, params, src_tok, tgt_tok, aligned,
                                                   d.num_steps)
                metrics.update({f"test_{k}": v for k, v in scored.items()})
            if workdir and jax.process_index() == 0:
                rows = [f"source\treference\tgreedy\tbeam{s.beam_size}\n"] + [
                    f"{p[0]}\t{p[1]}\t{g}\t{b}\n" for p, g, b in zip(test_pairs, greedy, beam)]
                files.write_text(os.path.join(workdir, "test_translations.tsv"), "".join(rows))
                shown = _spread(sources, s.num_attention_maps)
                _attention_maps(model, params, src_tok, tgt_tok, [sources[i] for i in shown],
                                [beam[i] for i in shown], d.num_steps,
                                os.path.join(workdir, "attention_maps.png"))
        return metrics

    tokenizers = _jsons(named)
    train = shards.train_batches(config, tokenizers,
                                 lambda: train_rows(config, src_tok, tgt_tok, splits["train"]),
                                 "pairs", transform=data_lib.teacher_forcing)
    return Task(init_params=init_params, loss=functools.partial(loss, model),
                train_batch=train,
                eval_batches=data_lib.eval_batches(*valid, d.eval_batch_size),
                batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
                tokens_per_batch=d.batch_size * d.num_steps, report=with_perplexity,
                files=shards.texts(tokenizers),
                translate_sentences=translate_sentences, decode_eval=decode_eval)


def _aligned_examples(config, train_pairs) -> list:
    """The hand-aligned pairs of `decode.alignment_file` whose source never occurs in training;
    None: the shipped ones, with the shipped corpus and word tokens only; '': none."""
    path = config.decode.get("alignment_file")
    if path == "" or (path is None and (config.data.path or config.data.tokenizer != "word")):
        return []
    seen = {data_lib.preprocess_nmt(pair[0]) for pair in train_pairs}
    return [e for e in data_lib.load_alignments(path) if e[0] not in seen]


def _spread(sources, n: int) -> list[int]:
    """Indices of n distinct sources at evenly spaced quantiles of the list (for the shipped
    pairs, sorted by length: from short to long sentences)."""
    first = list({source: i for i, source in reversed(list(enumerate(sources)))}.values())[::-1]
    return [first[int(q * len(first))] for q in (np.arange(n) + 1) / (n + 1)]


def _bleu(pairs, hypotheses) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenisation) against the preprocessed, lowercased targets."""
    references = [" ".join(data_lib.tokenize_words(data_lib.preprocess_nmt(p[1]))) for p in pairs]
    return sacrebleu.corpus_bleu(hypotheses, [references], force=True).score


def _encode_inputs(src_tok, sentences, num_steps, on_error=None):
    """Source ids [N, num_steps] and lengths [N] of the user sentences that can be read, and
    their indices; a sentence that cannot is a ValueError, or is passed to `on_error`."""
    ids, kept = [], []
    for i, sentence in enumerate(sentences):
        tokens = src_tok.encode(sentence)
        problem = None
        if not tokens:
            problem = f"sentence {i + 1} ({sentence!r}) is empty"
        elif all(t == data_lib.UNK_ID for t in tokens):
            problem = (f"sentence {i + 1} ({sentence!r}) holds no word of the source "
                       f"vocabulary")
        if problem is not None:
            if on_error is None:
                raise ValueError(problem)
            on_error(problem)
            continue
        if len(tokens) > num_steps - 1:
            warnings.warn(f"sentence {i + 1} has {len(tokens)} tokens; the model reads at most "
                          f"{num_steps - 1} (data.num_steps - 1 for <eos>): truncated",
                          stacklevel=2)
        ids.append(tokens)
        kept.append(i)
    return (*data_lib.build_array(ids, num_steps), kept)


class Searcher:
    """Greedy (beam 1) or beam search over an `EncoderDecoder`, jitted once per beam size and
    run in batches of `batch_size` sentences (the last one padded), so any number of sentences
    reuses one compiled search."""

    def __init__(self, model: EncoderDecoder, num_steps: int, batch_size: int):
        self.model, self.num_steps, self.batch_size = model, num_steps, batch_size
        self.cached = model.clone(decoder=model.decoder.clone(decode=True)) \
            if isinstance(model.decoder, TransformerDecoder) else None
        self._search = jax.jit(self._search_batch, static_argnames=("beam_size",))

    def _search_batch(self, params, src_BxS, src_len_B, length_penalty, *, beam_size):
        model, B = self.cached or self.model, src_BxS.shape[0]
        memory = model.apply(params, src_BxS, src_len_B, method=model.encode)
        cache = {}
        if self.cached is not None:
            tokens = jnp.zeros((B, self.num_steps), jnp.int32)
            shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), src_BxS, src_len_B, tokens)
            cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes["cache"])

        def step(tokens_B, state):
            cache, memory = state
            if cache:
                (logits, memory), variables = model.apply(
                    {**params, "cache": cache}, tokens_B[:, None], memory, method=model.decode,
                    mutable=["cache"])
                cache = variables["cache"]
            else:
                logits, memory = model.apply(params, tokens_B[:, None], memory,
                                             method=model.decode)
            return logits[:, -1], (cache, memory)

        ids = dict(max_len=self.num_steps, bos_id=data_lib.BOS_ID, eos_id=data_lib.EOS_ID,
                   pad_id=data_lib.PAD_ID)
        if beam_size == 1:
            tokens_BxL, _ = decoding.greedy_search(step, (cache, memory), batch_size=B, **ids)
            return tokens_BxL
        tokens_BxKxL, _ = decoding.beam_search(step, (cache, memory), batch_size=B,
                                               beam_size=beam_size,
                                               length_penalty=length_penalty, **ids)
        return tokens_BxKxL[:, 0]

    def __call__(self, params, src_NxS, src_len_N, beam_size: int, length_penalty: float):
        N, B = len(src_NxS), self.batch_size
        if N == 0:
            return []
        out = []
        for start in range(0, N, B):
            src, src_len = src_NxS[start:start + B], src_len_N[start:start + B]
            pad = B - len(src)
            src = np.concatenate([src, np.repeat(src[-1:], pad, 0)])
            src_len = np.concatenate([src_len, np.repeat(src_len[-1:], pad, 0)])
            tokens = self._search(params, src, src_len, jnp.float32(length_penalty),
                                  beam_size=beam_size)
            out.append(np.asarray(tokens)[:B - pad])
        return np.concatenate(out).tolist()


def _attention_maps(model, params, src_tok, tgt_tok, sources, hypotheses, num_steps, path):
    """One heatmap per sentence: source tokens (columns, with <eos>) against the generated
    target tokens (rows, each the prediction made from the attention in its row)."""
    plt = plotting.pyplot()
    fig, axes = plt.subplots(1, len(sources), figsize=(4.5 * len(sources), 4.2), squeeze=False)
    for ax, source, hypothesis in zip(axes[0], sources, hypotheses):
        src, src_len, _ = _encode_inputs(src_tok, [source], num_steps)
        tgt = tgt_tok.encode(hypothesis)[:num_steps - 1] + [data_lib.EOS_ID]
        tgt_in = np.asarray([[data_lib.BOS_ID] + tgt[:-1]], np.int32)
        weights_TxS = cross_attention.cross_attention_weights(model, params, src, src_len,
                                                              tgt_in)[0]
        S = int(src_len[0])
        ax.imshow(weights_TxS[:, :S], cmap="Reds", vmin=0, vmax=1)
        ax.set_xticks(range(S), src_tok.tokens(src[0, :S].tolist()), rotation=90, fontsize=8)
        ax.set_yticks(range(len(tgt)), tgt_tok.tokens(tgt), fontsize=8)
    fig.suptitle("Cross-attention: target tokens (rows) over source tokens (columns)")
    fig.tight_layout()
    plotting.save(fig, path)
