"""Sentence pairs for machine translation: loading, the textbook's preprocessing, word or
subword tokenizers, a split whose test sources never occur in training, and minibatches.

Follows the chapter "Machine Translation and the Dataset" of Dive into Deep Learning (d2l:
`preprocess_nmt`, `tokenize_nmt`, `truncate_pad`, `build_array_nmt`) with `<eos>` always kept:
a sentence is cut to `num_steps - 1` tokens before `<eos>` is appended, so the model always
sees where a sentence ends. Every tokenizer has the same four reserved ids, `<unk>` 0,
`<pad>` 1, `<bos>` 2, `<eos>` 3, so models, searches and checkpoints do not depend on the kind.

The shipped corpus is the 167,130 English-French pairs of the Tatoeba project, distributed
by manythings.org (CC BY 2.0 FR; attribution: "www.manythings.org/anki and tatoeba.org"; see
`fra_eng/SOURCE.md` and `fra_eng/_about.txt`). Any file of `source<TAB>target` lines, plain
or gzipped, works the same way (further tab-separated columns are ignored).

Packed training rows (`pack_pairs`) hold several pairs a row: source and target of a pair
under the same segment number in a source row and a target row of `num_steps` tokens each.

Dimension letters: N sentences, B batch, T num_steps, R packed rows.
"""

import gzip
import importlib.resources
import json
import numbers
import re

import numpy as np

from seqjax import files
from seqjax.data import packing
from seqjax.data.batching import RowBatches, padded_batches
from seqjax.data.text import Vocab, read_text_file

UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<bos>", "<eos>"
UNK_ID, PAD_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
RESERVED = (UNK, PAD, BOS, EOS)
TOKENIZER_KINDS = ("word", "bpe", "wordpiece")


def load_pairs(path=None, max_pairs: int | None = None) -> list[tuple[str, str]]:
    """(source, target) pairs from the shipped English-French file, or from `path` (UTF-8,
    `.gz` read compressed). Blank lines are skipped; a line without a tab, or with an empty
    side, is an error naming the line. `max_pairs` keeps the first ones."""
    if path is None:
        name = "the shipped English-French pairs"
        resource = importlib.resources.files("seqjax.data").joinpath("fra_eng/fra.txt.gz")
        lines = gzip.decompress(resource.read_bytes()).decode("utf-8").splitlines()
    else:
        name = repr(str(files.path(path).expanduser()))
        lines = read_text_file(path, "sentence-pair file").splitlines()
    pairs = parse_pairs(lines, name, max_pairs=max_pairs)
    if not pairs:
        raise ValueError(f"{name} holds no sentence pair")
    return pairs


def load_alignments(path=None) -> list[tuple[str, str, list[tuple[int, int]]]]:
    """(source, target, links) of a file of `source<TAB>target<TAB>links` lines (`#` comments),
    by default the 30 hand-aligned test pairs shipped in `fra_eng/alignments.tsv`: a link
    (i, j) says source word i translates target word j, 0-based over the words of the
    preprocessed sentences ('i-j' in the file). Errors name the line."""
    if path is None:
        name = "the shipped alignments"
        text = importlib.resources.files("seqjax.data").joinpath(
            "fra_eng/alignments.tsv").read_text("utf-8")
    else:
        name = repr(str(files.path(path).expanduser()))
        text = read_text_file(path, "alignment file")
    examples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            source, target, links = line.split("\t")
            source, target = preprocess_nmt(source), preprocess_nmt(target)
            pairs = [tuple(int(k) for k in link.split("-")) for link in links.split()]
            if not pairs or any(len(p) != 2 for p in pairs):
                raise ValueError
        except ValueError:
            raise ValueError(f"line {number} of {name} is not 'source<TAB>target<TAB>links' "
                             f"with links 'i-j': {line[:80]!r}") from None
        lengths = len(tokenize_words(source)), len(tokenize_words(target))
        for i, j in pairs:
            if not (0 <= i < lengths[0] and 0 <= j < lengths[1]):
                raise ValueError(f"line {number} of {name}: link {i}-{j} is outside the "
                                 f"{lengths[0]} source and {lengths[1]} target words")
        examples.append((source, target, pairs))
    if not examples:
        raise ValueError(f"{name} holds no aligned pair")
    return examples


def parse_pairs(lines, name: str, first_number: int = 1, max_pairs: int | None = None
                ) -> list[tuple[str, str]]:
    """The (source, target) pairs of `lines` (of the file `name`, from its line `first_number`:
    a whole file or a block of one), as `load_pairs` reads them."""
    pairs = []
    for number, line in enumerate(lines, first_number):
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            raise ValueError(f"line {number} of {name} is not 'source<TAB>target': {line[:80]!r}")
        pairs.append((fields[0], fields[1]))
    return pairs


def preprocess_nmt(text: str) -> str:
    """d2l `preprocess_nmt`: no-break spaces become spaces, lower case, and a space before each
    of `,.!?` that does not follow one."""
    text = text.replace("\u202f", " ").replace("\xa0", " ").lower()
    return re.sub(r"(?<=\S)([,.!?])", r" \1", text)


def tokenize_words(text: str) -> list[str]:
    return text.split()


class Tokenizer:
    """Text to ids and back, trained on a list of sentences: the textbook's word vocabulary
    (`Vocab` with `min_freq`, at most `vocab_size` ids), or byte-pair / WordPiece subwords from
    the `tokenizers` library (a `vocab_size` budget and `min_freq` for merges) for corpora whose
    words are too many for a word vocabulary. Text is preprocessed (`preprocess_nmt`) before it
    is split, and `decode` returns preprocessed words joined by spaces."""

    def __init__(self, kind: str, model):
        if kind not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer kind {kind!r}: expected one of {TOKENIZER_KINDS}")
        self.kind, self.model = kind, model

    @classmethod
    def train(cls, texts, *, kind: str = "word", min_freq: int = 2,
              vocab_size: int | None = None) -> "Tokenizer":
        texts = [preprocess_nmt(t) for t in texts]
        if kind == "word":
            vocab = Vocab([tokenize_words(t) for t in texts], min_freq=min_freq,
                          reserved_tokens=RESERVED[1:], max_size=vocab_size)
            return cls(kind, vocab)
        if kind not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer kind {kind!r}: expected one of {TOKENIZER_KINDS}")
        import tokenizers
        from tokenizers import decoders, models, pre_tokenizers, trainers
        options = dict(min_frequency=min_freq, special_tokens=list(RESERVED), show_progress=False)
        if vocab_size is not None:
            options["vocab_size"] = vocab_size
        if kind == "bpe":
            hf = tokenizers.Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix="</w>"))
            trainer = trainers.BpeTrainer(end_of_word_suffix="</w>", **options)
            hf.decoder = decoders.BPEDecoder(suffix="</w>")
        else:
            hf = tokenizers.Tokenizer(models.WordPiece(unk_token=UNK))
            trainer = trainers.WordPieceTrainer(**options)
            hf.decoder = decoders.WordPiece(cleanup=False)
        hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        hf.train_from_iterator(texts, trainer)
        return cls(kind, hf)

    def __len__(self) -> int:
        return len(self.model) if self.kind == "word" else self.model.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        text = preprocess_nmt(text)
        if self.kind == "word":
            return self.model[tokenize_words(text)]
        return self.model.encode(text, add_special_tokens=False).ids

    def tokens(self, ids) -> list[str]:
        if self.kind == "word":
            return self.model.to_tokens(list(ids))
        return [self.model.id_to_token(int(i)) for i in ids]

    def decode(self, ids) -> str:
        """The text of `ids` up to the first `<eos>`, without `<pad>` and `<bos>`."""
        ids = [int(i) for i in ids]
        ids = ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids
        ids = [i for i in ids if i not in (PAD_ID, BOS_ID)]
        if self.kind == "word":
            return " ".join(self.model.to_tokens(ids))
        return self.model.decode(ids, skip_special_tokens=False)

    def to_json(self) -> str:
        model = self.model.to_json() if self.kind == "word" else self.model.to_str()
        return json.dumps({"format": "seqjax.Tokenizer", "version": 1, "kind": self.kind,
                           "model": model}, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> "Tokenizer":
        try:
            data = json.loads(s)
            fmt, kind, model = data.get("format"), data["kind"], data["model"]
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as err:
            raise ValueError(f"malformed tokenizer JSON: {err!r}") from None
        if fmt != "seqjax.Tokenizer" or data.get("version") != 1:
            raise ValueError(f"not a version-1 seqjax.Tokenizer: format={fmt!r}")
        if kind == "word":
            return cls(kind, Vocab.from_json(model))
        import tokenizers
        try:
            return cls(kind, tokenizers.Tokenizer.from_str(model))
        except Exception as err:  # tokenizers raises plain Exception
            raise ValueError(f"malformed {kind} tokenizer JSON: {err}") from None

    def __eq__(self, other):
        return isinstance(other, Tokenizer) and self.to_json() == other.to_json()

    __hash__ = None


def split_pairs(pairs, *, num_valid: int, num_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Indices of a seeded train / valid / test split in which no source sentence is shared
    between splits (Tatoeba has several translations of one English sentence, and a test
    source seen in training would flatter BLEU). Distinct sources are shuffled and dealt whole
    to test, then valid, then train; the group that crosses a split's size is cut and its
    remaining pairs are dropped, so test and valid have exactly `num_test` and `num_valid`."""
    for name, value in (("num_valid", num_valid), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name}={value!r}: must be an integer >= 0")
    groups: dict[str, list[int]] = {}
    for i, (source, _) in enumerate(pairs):
        groups.setdefault(preprocess_nmt(source).strip(), []).append(i)
    members = list(groups.values())
    quotas = [("test", num_test), ("valid", num_valid)]
    splits = {"test": [], "valid": [], "train": []}
    for g in np.random.default_rng(seed).permutation(len(members)):
        while quotas and len(splits[quotas[0][0]]) >= quotas[0][1]:
            quotas.pop(0)
        if quotas:
            name, size = quotas[0]
            splits[name].extend(members[g][:size - len(splits[name])])
        else:
            splits["train"].extend(members[g])
    if len(splits["test"]) < num_test or len(splits["valid"]) < num_valid or not splits["train"]:
        raise ValueError(f"{len(pairs)} pairs ({len(groups)} distinct sources) are too few for "
                         f"num_test={num_test}, num_valid={num_valid} and a training split")
    return {name: np.sort(np.asarray(idx, np.int64)) for name, idx in splits.items()}


def build_array(id_lists, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids [N, T]: each sentence cut to T - 1 tokens, then `<eos>`, then `<pad>`; and
    the valid lengths [N] (tokens plus `<eos>`)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 2:
        raise ValueError(f"num_steps={num_steps!r}: must be an integer >= 2 (a token and <eos>)")
    ids_NxT = np.full((len(id_lists), num_steps), PAD_ID, np.int32)
    valid_N = np.zeros(len(id_lists), np.int32)
    for n, ids in enumerate(id_lists):
        ids = list(ids)[:num_steps - 1] + [EOS_ID]
        ids_NxT[n, :len(ids)] = ids
        valid_N[n] = len(ids)
    return ids_NxT, valid_N


def pack_pairs(src_NxT, src_len_N, tgt_NxT, tgt_len_N, align: int = 1) -> dict:
    """The pairs of `build_array`'s arrays packed first-fit decreasing (`packing.first_fit`,
    each sentence starting at a multiple of `align`) into rows of the same lengths, a pair's
    source and target under one segment number: src, tgt [R, T] (`<pad>` between and after
    the pairs), and for each side `{side}_segment_ids` (0 at padding, 1..k) and
    `{side}_positions` (restarting at 0 with each pair)."""
    row_N = packing.first_fit(np.stack([src_len_N, tgt_len_N], 1),
                              (src_NxT.shape[1], tgt_NxT.shape[1]), align=align)
    rows = {}
    for side, ids, lengths in (("src", src_NxT, src_len_N), ("tgt", tgt_NxT, tgt_len_N)):
        packed = packing.Packing(row_N, lengths, ids.shape[1], align)
        rows.update({side: packed.tokens(ids, PAD_ID),
                     f"{side}_segment_ids": packed.segment_ids(),
                     f"{side}_positions": packed.positions()})
    return rows


def teacher_forcing(rows: dict) -> dict:
    """The model's batch of training rows: the decoder reads `<bos>` and the target shifted
    right, and predicts the target; `weights` is 1 on the target's real tokens. Rows of
    `build_array` (src, src_len, tgt, tgt_len) or packed ones (`pack_pairs`), whose shift
    restarts with `<bos>` at the start of each pair and whose segment ids and positions pass
    through."""
    tgt_BxT = rows["tgt"]
    tgt_in = np.concatenate([np.full((len(tgt_BxT), 1), BOS_ID, np.int32), tgt_BxT[:, :-1]], 1)
    if "tgt_segment_ids" not in rows:
        weights = (np.arange(tgt_BxT.shape[1]) < rows["tgt_len"][:, None]).astype(np.float32)
        return {"src": rows["src"], "src_valid_len": rows["src_len"], "tgt_in": tgt_in,
                "tgt_out": tgt_BxT, "weights": weights}
    real = rows["tgt_segment_ids"] > 0
    tgt_in = np.where(real, np.where(rows["tgt_positions"] == 0, BOS_ID, tgt_in), PAD_ID)
    return {**{k: rows[k] for k in ("src", "src_segment_ids", "src_positions",
                                    "tgt_segment_ids", "tgt_positions")},
            "tgt_in": tgt_in.astype(np.int32), "tgt_out": tgt_BxT,
            "weights": real.astype(np.float32)}


class TranslationBatches(RowBatches):
    """Training minibatches of `build_array`'s arrays as a pure function of the step
    (`batching.RowBatches` over the pairs), with teacher forcing's inputs and weights."""

    def __init__(self, src, src_len, tgt, tgt_len, batch_size: int, *, seed: int = 0,
                 shard_index: int = 0, num_shards: int = 1):
        super().__init__(dict(src=src, src_len=src_len, tgt=tgt, tgt_len=tgt_len), batch_size,
                         seed=seed, shard_index=shard_index, num_shards=num_shards, what="pairs",
                         transform=teacher_forcing)


def eval_batches(src, src_len, tgt, tgt_len, batch_size: int) -> list[dict]:
    """Every pair once, in order; the last minibatch is filled with copies of its first pair
    carrying zero weight."""
    batches = []
    for rows in padded_batches(dict(src=src, src_len=src_len, tgt=tgt, tgt_len=tgt_len),
                               batch_size, what="pairs"):
        batch = teacher_forcing(rows)
        batch["weights"] = batch["weights"] * rows["row_weight"][:, None]
        batches.append(batch)
    return batches
