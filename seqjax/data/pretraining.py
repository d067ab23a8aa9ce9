"""Data for BERT: a WordPiece tokenizer, WikiText documents as pretraining sequences
`[CLS] A [SEP] B [SEP]` with segment ids and next-sentence labels, and SST-2 sentences for
fine-tuning.

The shipped corpora: WikiText-2 (Merity et al. 2016; CC BY-SA 3.0, Wikipedia contributors; see
`wikitext2/SOURCE.md`) and SST-2 from GLUE (Socher et al. 2013; no explicit license, see
`sst2/SOURCE.md`). A user's files in the same layouts work the same way, plain or gzipped:
WikiText's (one paragraph per line, articles opened by a ` = Title = ` line, section headings
` = = Section = = `, tokens separated by spaces) and GLUE's (`sentence<TAB>label` with a header
line).

Packed pretraining rows (`pack_pretraining`) hold several sequences a row, told apart by
`pack_ids` (not `segments`, BERT's token types A/B within a sequence).

Dimension letters: N sequences, L max_seq_len, R packed rows, M packed sequences a row.
"""

import gzip
import importlib.resources
import re
from typing import NamedTuple

import numpy as np

from seqjax import files
from seqjax.data import packing
from seqjax.data.text import read_text_file

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))  # seqjax's own tokenizers


class SpecialIds(NamedTuple):
    """The ids of `SPECIAL_TOKENS` in a tokenizer: 0-4 in those seqjax trains, elsewhere in an
    imported one (Google's BERT vocabularies: [PAD] 0, [UNK] 100, [CLS] 101, ...)."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int


SEQJAX_IDS = SpecialIds(PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)
WIKITEXT_SPLITS = ("train", "valid", "test")
SST2_SPLITS = ("train", "dev")
ARTICLE = re.compile(r"^ = [^=].* = $")
_HEADING = re.compile(r"^ = .* = $")
_SENTENCE_END = frozenset(".?!")


def _corpus(corpus: str, split: str, splits, shipped: str, path, kind: str) -> tuple[str, str]:
    """(a name for errors, text) of a shipped split (`shipped`: its gzipped file, with `{}` for
    the split) or of the user's file at `path`."""
    if path is not None:
        return repr(str(files.path(path).expanduser())), read_text_file(path, kind)
    if split not in splits:
        raise ValueError(f"{corpus} split {split!r}: expected one of {splits}")
    resource = importlib.resources.files("seqjax.data").joinpath(shipped.format(split))
    return (f"the shipped {corpus} {split} split",
            gzip.decompress(resource.read_bytes()).decode("utf-8"))


def load_wikitext(split: str = "train", path=None, max_documents: int | None = None
                  ) -> list[list[str]]:
    """Documents (articles), each a list of sentences, of a WikiText split (`path`: a file in
    WikiText's layout instead; `max_documents`: the first ones only). WikiText's own
    tokenisation is undone where it splits words (`@-@` `@,@` `@.@`), `<unk>` becomes
    `[UNK]`, and a paragraph is split into sentences after each `.`, `?` or `!` token. An
    empty corpus is an error."""
    name, text = _corpus("WikiText-2", split, WIKITEXT_SPLITS, "wikitext2/wiki.{}.tokens.gz",
                         path, "WikiText file")
    documents = parse_wikitext(text)[:max_documents]
    if not documents:
        raise ValueError(f"{name} holds no text")
    return documents


def parse_wikitext(text: str) -> list[list[str]]:
    """The documents of text in WikiText's layout (`load_wikitext`), a whole file or a block of
    whole articles of one."""
    documents, current = [], []
    for line in text.split("\n"):
        if ARTICLE.match(line):
            if current:
                documents.append(current)
            current = []
        elif line.strip() and not _HEADING.match(line):
            current.extend(_sentences(line))
    if current:
        documents.append(current)
    return documents


def _sentences(paragraph: str) -> list[str]:
    text = paragraph.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    sentences, words = [], []
    for word in text.split():
        words.append("[UNK]" if word == "<unk>" else word)
        if word in _SENTENCE_END:
            sentences.append(" ".join(words))
            words = []
    if words:
        sentences.append(" ".join(words))
    return sentences


def train_tokenizer(sentences, vocab_size: int):
    """A lower-casing WordPiece tokenizer (BERT's normaliser and pre-tokeniser) from the
    `tokenizers` library, with the special tokens at ids 0-4 (`SPECIAL_TOKENS`)."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    tokenizer = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    tokenizer.train_from_iterator(sentences, trainer)
    check_tokenizer(tokenizer)
    return tokenizer


def tokenizer_from_json(text: str, what: str = "tokenizer"):
    import tokenizers
    try:
        tokenizer = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises plain Exception
        raise ValueError(f"{what} is not a tokenizers JSON file: {e}") from None
    check_tokenizer(tokenizer, what)
    return tokenizer


def check_tokenizer(tokenizer, what: str = "tokenizer"):
    """Raises a ValueError unless `tokenizer` holds every one of `SPECIAL_TOKENS`, [PAD] at id 0
    (rows are padded with zeros)."""
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    if None in ids or ids[0] != PAD_ID:
        raise ValueError(f"{what} must hold {SPECIAL_TOKENS}, [PAD] at id 0; their ids: {ids}")


def special_ids(tokenizer) -> SpecialIds:
    return SpecialIds(*(tokenizer.token_to_id(t) for t in SPECIAL_TOKENS))


def continuation_table(tokenizer) -> np.ndarray:
    """[V] bool: True for WordPiece continuation pieces ('##...'), for whole-word masking."""
    vocab = tokenizer.get_vocab()
    table = np.zeros(tokenizer.get_vocab_size(), bool)
    for token, i in vocab.items():
        table[i] = token.startswith("##")
    return table


def encode_documents(tokenizer, documents) -> list[list[list[int]]]:
    """Token ids of each sentence of each document (sentences that encode to nothing dropped)."""
    flat = [s for doc in documents for s in doc]
    encoded = [e.ids for e in tokenizer.encode_batch(flat, add_special_tokens=False)]
    out, i = [], 0
    for doc in documents:
        sentences = [ids for ids in encoded[i:i + len(doc)] if ids]
        i += len(doc)
        if sentences:
            out.append(sentences)
    return out


def pretraining_arrays(documents, max_seq_len: int, *, nsp: bool = True, seed: int = 0,
                       dupe_factor: int = 1, special: SpecialIds = SEQJAX_IDS) -> dict:
    """Pretraining sequences from tokenised documents (lists of sentences of ids), after
    BERT's `create_pretraining_data`: consecutive sentences of a document are gathered until
    they fill `max_seq_len`. With `nsp`, the chunk is cut at a random sentence boundary into A
    and B; half of the time (and always when the chunk is one sentence) B is replaced by
    sentences from a random other document (label 0; 1 when B really follows A), and the pair
    is trimmed, longer side first, to `[CLS] A [SEP] B [SEP]`. Without `nsp`, the chunk fills
    `[CLS] A [SEP]`. `dupe_factor` passes over the corpus with different random cuts.
    `special`: the tokenizer's ids of [CLS] and [SEP] (and the others).

    Returns tokens and segments [N, L] int32 (padding 0), valid_len [N], nsp_label [N]."""
    if max_seq_len < (5 if nsp else 3):
        raise ValueError(f"max_seq_len={max_seq_len}: too short for [CLS] A [SEP]"
                         + (" B [SEP]" if nsp else ""))
    if nsp and len(documents) < 2:
        raise ValueError("next-sentence prediction needs at least two documents")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(dupe_factor):
        for d in rng.permutation(len(documents)):
            rows.extend(_document_rows(documents, int(d), max_seq_len, nsp, rng))
    if not rows:
        raise ValueError("the corpus gives no pretraining sequence")
    N = len(rows)
    out = dict(tokens=np.zeros((N, max_seq_len), np.int32),
               segments=np.zeros((N, max_seq_len), np.int32),
               valid_len=np.zeros(N, np.int32), nsp_label=np.zeros(N, np.int32))
    for n, (a, b, label) in enumerate(rows):
        ids = [special.cls, *a, special.sep] + ([*b, special.sep] if b is not None else [])
        out["tokens"][n, :len(ids)] = ids
        out["segments"][n, len(a) + 2:len(ids)] = 1
        out["valid_len"][n] = len(ids)
        out["nsp_label"][n] = label
    return out


def pack_pretraining(arrays: dict, max_sequences: int, align: int = 1) -> dict:
    """The sequences of `pretraining_arrays` packed first-fit decreasing (`packing.first_fit`),
    at most `max_sequences` a row, each starting at a multiple of `align`, into rows of the
    same length: tokens and segments (token
    types) [R, L]; `pack_ids` [R, L] (1..k: the row's packed sequence a token belongs to, 0 at
    padding) and `position_ids` [R, L] (restarting at 0 with each sequence); and per packed
    sequence [R, M]: `cls_positions` (where its [CLS] is), `nsp_label` and `nsp_weight` (1 for
    a sequence, 0 for an empty slot)."""
    L, lengths_N = arrays["tokens"].shape[1], arrays["valid_len"]
    row_N = packing.first_fit(lengths_N, L, max_per_row=max_sequences, align=align)
    packed = packing.Packing(row_N, lengths_N, L, align)

    def per_sequence(values_N):
        return packed.per_sequence(values_N, max_sequences)

    return dict(tokens=packed.tokens(arrays["tokens"], PAD_ID),
                segments=packed.tokens(arrays["segments"]),
                pack_ids=packed.segment_ids(), position_ids=packed.positions(),
                cls_positions=per_sequence(packed.offset_N.astype(np.int32)),
                nsp_label=per_sequence(arrays["nsp_label"]),
                nsp_weight=per_sequence(np.ones(len(lengths_N), np.float32)))


def _document_rows(documents, d: int, max_seq_len: int, nsp: bool, rng):
    doc, target = documents[d], max_seq_len - (3 if nsp else 2)
    rows, chunk, length, i = [], [], 0, 0
    while i < len(doc):
        chunk.append(doc[i])
        length += len(doc[i])
        if i == len(doc) - 1 or length >= target:
            if not nsp:
                rows.append(([t for s in chunk for t in s][:target], None, 0))
            else:
                cut = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
                a = [t for s in chunk[:cut] for t in s]
                if len(chunk) == 1 or rng.random() < 0.5:
                    label, b = 0, _random_sentences(documents, d, max(target - len(a), 1), rng)
                    i -= len(chunk) - cut  # the unused sentences start the next chunk
                else:
                    label, b = 1, [t for s in chunk[cut:] for t in s]
                a, b = _trim_pair(a, b, target, rng)
                rows.append((a, b, label))
            chunk, length = [], 0
        i += 1
    return rows


def _random_sentences(documents, d: int, length: int, rng) -> list[int]:
    other = int(rng.integers(len(documents) - 1))
    other += other >= d
    doc = documents[other]
    out = []
    for sentence in doc[int(rng.integers(len(doc))):]:
        out.extend(sentence)
        if len(out) >= length:
            break
    return out


def _trim_pair(a, b, target: int, rng):
    """Removes tokens from the longer of a and b, at its front or back at random, until both
    fit in `target` tokens (each keeps at least one)."""
    a, b = list(a), list(b)
    while len(a) + len(b) > target:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
    return a, b


def load_sst2(split: str = "train", path=None) -> tuple[list[str], np.ndarray]:
    """(sentences, int32 labels) of an SST-2 split, or of a GLUE-style `sentence<TAB>label` file
    with a header (`path`). A malformed line or an empty file is an error naming it."""
    name, text = _corpus("SST-2", split, SST2_SPLITS, "sst2/{}.tsv.gz", path,
                         "classification file")
    sentences, labels = [], []
    for number, line in enumerate(text.split("\n")[1:], 2):
        if not line.strip():
            continue
        fields = line.rsplit("\t", 1)
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip().isdigit():
            raise ValueError(f"line {number} of {name} is not 'sentence<TAB>label': {line[:80]!r}")
        sentences.append(fields[0].strip())
        labels.append(int(fields[1]))
    if not sentences:
        raise ValueError(f"{name} holds no labelled sentence")
    return sentences, np.asarray(labels, np.int32)


def classification_arrays(tokenizer, sentences, max_seq_len: int) -> dict:
    """`[CLS] sentence [SEP]` ids [N, L] (a sentence cut to L - 2 pieces), segments (all 0) and
    valid lengths."""
    N, special = len(sentences), special_ids(tokenizer)
    tokens = np.zeros((N, max_seq_len), np.int32)
    valid_len = np.zeros(N, np.int32)
    for n, e in enumerate(tokenizer.encode_batch(list(sentences), add_special_tokens=False)):
        ids = [special.cls, *e.ids[:max_seq_len - 2], special.sep]
        tokens[n, :len(ids)] = ids
        valid_len[n] = len(ids)
    return dict(tokens=tokens, segments=np.zeros_like(tokens), valid_len=valid_len)
