"""Text preprocessing, vocabularies and language-model minibatches.

Follows the chapter "Text Preprocessing" and "Language Models" of Dive into Deep Learning
(d2l: `read_time_machine`, `tokenize`, `Vocab`, `seq_data_iter_random`,
`seq_data_iter_sequential`), with one change: a minibatch is a pure function of
(seed, step) instead of the next item of a Python iterator, so a run resumes exactly from its
step number and no iterator state has to be checkpointed.

Dimension letters: B batch (rows), T num_steps (time), N tokens in the stream.
"""

import collections
import contextlib
import gzip
import importlib.resources
import json
import math
import numbers
import re

import numpy as np

from seqjax import files

PREPROCESS_MODES = ("letters", "raw")
TOKEN_UNITS = ("char", "word")
PARTITIONS = ("random", "sequential")


def load_text(path=None) -> str:
    """The shipped Time Machine (d2l `read_time_machine`), or the UTF-8 text file at `path` (a
    local path or a URL: gs://bucket/corpus.txt)."""
    if path is None:
        resource = importlib.resources.files("seqjax.data").joinpath("timemachine/timemachine.txt")
        return resource.read_text(encoding="utf-8")
    text = read_text_file(path, "text file")
    if not text.strip():
        raise ValueError(f"text file {str(files.path(path).expanduser())!r} is empty (or holds "
                         f"only whitespace)")
    return text


def read_text_file(path, what: str) -> str:
    """The UTF-8 text of the file at `path`, a local path or a URL that `seqjax.files` reaches
    (gunzipped if it ends in `.gz`), with universal newlines as `Path.read_text` reads them, and
    errors that name the file as `what` instead of raw OS or codec tracebacks."""
    path = files.path(path).expanduser()
    with named_errors(path, what):
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
        return text.replace("\r\n", "\n").replace("\r", "\n")


@contextlib.contextmanager
def named_errors(path, what: str):
    """Turns the OS, codec and gzip errors of reading the file `path` into errors that name it
    as `what`."""
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {str(path)!r}") from None
    except IsADirectoryError:
        raise ValueError(f"{str(path)!r} is a directory, not a {what}") from None
    except PermissionError:
        raise ValueError(f"{what} {str(path)!r} is not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{what} {str(path)!r} is not a valid gzip file ({e})") from None


def preprocess(text: str, mode: str = "letters") -> str:
    """'letters': d2l's `re.sub('[^A-Za-z]+', ' ', text).lower()`, so every run of non-letters
    becomes one space; 'raw': the text unchanged."""
    if mode == "letters":
        return re.sub("[^A-Za-z]+", " ", text).lower()
    if mode == "raw":
        return text
    raise ValueError(f"preprocess mode {mode!r}: expected one of {PREPROCESS_MODES}")


def tokenize(text: str, unit: str = "char") -> list[str]:
    """d2l `tokenize` on the whole text: its characters, or its whitespace-separated words."""
    if unit == "char":
        return list(text)
    if unit == "word":
        return text.split()
    raise ValueError(f"token unit {unit!r}: expected one of {TOKEN_UNITS}")


class Vocab:
    """d2l `Vocab`: `<unk>` is id 0, then the reserved tokens in order, then the other tokens by
    descending frequency, ties broken by the token so the ids do not depend on the corpus order
    (d2l's own tie order follows `Counter` insertion). Tokens seen fewer than `min_freq` times
    have no id of their own and map to `<unk>`; with `max_size`, so do all but the most frequent
    ones beyond `max_size` ids in all."""

    unk = 0
    UNK_TOKEN = "<unk>"

    def __init__(self, tokens=(), min_freq: int = 0, reserved_tokens=(),
                 max_size: int | None = None):
        tokens = list(tokens)
        if tokens and isinstance(tokens[0], (list, tuple)):  # lines of tokens, as d2l allows
            tokens = [token for line in tokens for token in line]
        reserved = list(reserved_tokens)
        if len(set(reserved)) != len(reserved) or self.UNK_TOKEN in reserved:
            raise ValueError(f"reserved_tokens {reserved!r} must be distinct "
                             f"and not {self.UNK_TOKEN!r}")
        counts = collections.Counter(tokens)
        self.token_freqs = sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))
        taken = {self.UNK_TOKEN, *reserved}
        kept = [t for t, freq in self.token_freqs if freq >= min_freq and t not in taken]
        if max_size is not None:
            if max_size < len(taken):
                raise ValueError(f"max_size={max_size} leaves no room for the {len(taken)} "
                                 f"reserved tokens")
            kept = kept[:max_size - len(taken)]
        self._set_tokens([self.UNK_TOKEN, *reserved, *kept])

    def _set_tokens(self, idx_to_token):
        self.idx_to_token = list(idx_to_token)
        self.token_to_idx = {token: idx for idx, token in enumerate(self.idx_to_token)}
        if (len(self.token_to_idx) != len(self.idx_to_token)
                or self.idx_to_token[:1] != [self.UNK_TOKEN]):
            raise ValueError(f"a vocabulary needs distinct tokens with {self.UNK_TOKEN!r} first")

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, tokens):
        if isinstance(tokens, (list, tuple)):
            return [self.token_to_idx.get(token, self.unk) for token in tokens]
        return self.token_to_idx.get(tokens, self.unk)

    def to_tokens(self, ids):
        if np.ndim(ids) == 0:
            idx = int(ids)
            if not 0 <= idx < len(self):
                raise IndexError(f"token id {idx} is outside the vocabulary [0, {len(self)})")
            return self.idx_to_token[idx]
        return [self.to_tokens(idx) for idx in np.asarray(ids).reshape(-1).tolist()]

    def encode(self, tokens) -> np.ndarray:
        return np.asarray(self[list(tokens)], dtype=np.int32)

    def __eq__(self, other):
        if not isinstance(other, Vocab):
            return NotImplemented
        return self.idx_to_token == other.idx_to_token and self.token_freqs == other.token_freqs

    __hash__ = None  # mutable lists inside

    def __repr__(self):
        return f"Vocab(size={len(self)}, first={self.idx_to_token[:8]!r})"

    def to_json(self) -> str:
        """The ids themselves, not the recipe: a vocabulary saved beside a checkpoint must read
        back identically even if the corpus or the ordering rule changes later."""
        return json.dumps({"format": "seqjax.Vocab", "version": 1,
                           "idx_to_token": self.idx_to_token,
                           "token_freqs": [[t, f] for t, f in self.token_freqs]},
                          ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> "Vocab":
        try:
            data = json.loads(s)
            if data.get("format") != "seqjax.Vocab" or data.get("version") != 1:
                raise ValueError(f"not a version-1 seqjax.Vocab: format={data.get('format')!r}")
            vocab = cls.__new__(cls)
            vocab._set_tokens(data["idx_to_token"])
            vocab.token_freqs = [(t, int(f)) for t, f in data["token_freqs"]]
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as err:
            raise ValueError(f"malformed vocabulary JSON: {err}") from err
        return vocab


def split_train_valid(ids, valid_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The last `valid_fraction` of the stream is held out, contiguous and unshuffled, so no
    validation text leaks into training through overlapping subsequences."""
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, numbers.Real) \
            or not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction={valid_fraction!r}: must be a number in (0, 1)")
    ids = _as_ids(ids)
    split = len(ids) - int(round(len(ids) * valid_fraction))
    if not 0 < split < len(ids):
        raise ValueError(f"valid_fraction={valid_fraction} of {len(ids)} tokens leaves an empty "
                         f"{'training' if split <= 0 else 'validation'} split")
    return ids[:split], ids[split:]


class LMBatches:
    """Language-model minibatches as a pure function of the step: `batches(step)` returns
    `inputs` and `targets` (int32 [B, T], targets one token later in the corpus) and `reset`.

    Each epoch (step // steps_per_epoch) discards a random number of leading tokens in [0, T),
    drawn from `default_rng((seed, epoch))`, as d2l does, so the subsequence boundaries move
    from epoch to epoch. Then
      'random' (d2l `seq_data_iter_random`): the rest is cut into non-overlapping subsequences
        of T tokens, shuffled by the same rng; minibatch k is subsequences [kB, (k+1)B).
        `reset` is always True: neighbouring rows are unrelated text.
      'sequential' (d2l `seq_data_iter_sequential`): the rest is cut into B contiguous rows and
        minibatch k is their columns [kT, (k+1)T), so row i of minibatch k+1 continues row i
        of minibatch k; `reset` is True only at k == 0, and the hidden state may be carried.
    steps_per_epoch is that of the largest offset, T - 1, so every epoch has the same length
    (d2l's length varies with the offset); a smaller offset leaves a few tokens unused.

    With `num_shards` > 1 a host gets only rows [shard_index, shard_index + 1) * B / num_shards
    of the global minibatch, which does not depend on the sharding.
    """

    def __init__(self, ids, batch_size: int, num_steps: int, *, partition: str = "random",
                 seed: int = 0, shard_index: int = 0, num_shards: int = 1):
        _check_positive_int(num_steps=num_steps)
        if partition not in PARTITIONS:
            raise ValueError(f"partition {partition!r}: expected one of {PARTITIONS}")
        check_sharding(batch_size, seed, shard_index, num_shards)
        self.ids = _as_ids(ids)
        self.batch_size, self.num_steps, self.partition = int(batch_size), int(num_steps), partition
        self.seed, self.shard_index, self.num_shards = int(seed), int(shard_index), int(num_shards)
        self.local_batch_size = self.batch_size // self.num_shards
        # With the worst offset T - 1 both partitions need (B + 1) * T tokens for one minibatch.
        needed = (self.batch_size + 1) * self.num_steps
        if len(self.ids) < needed:
            raise ValueError(
                f"a corpus of {len(self.ids)} tokens is too short for one minibatch of "
                f"batch_size={batch_size} x num_steps={num_steps}: need at least {needed} tokens "
                f"((batch_size + 1) * num_steps, to allow a random start offset of up to "
                f"num_steps - 1)")
        self.steps_per_epoch = self._num_batches(self.num_steps - 1)
        self._epoch_cache = (None, None)  # one epoch's (offset, order); a pure memo, not state

    def _num_batches(self, offset: int) -> int:
        usable = len(self.ids) - offset - 1  # one token is kept back for the last target
        if self.partition == "random":
            return usable // self.num_steps // self.batch_size
        return usable // self.batch_size // self.num_steps

    def _epoch(self, epoch: int):
        if self._epoch_cache[0] != epoch:
            rng = np.random.default_rng((self.seed, epoch))
            offset = int(rng.integers(self.num_steps))
            order = None
            if self.partition == "random":
                order = rng.permutation((len(self.ids) - offset - 1) // self.num_steps)
            self._epoch_cache = (epoch, (offset, order))
        return self._epoch_cache[1]

    def __call__(self, step: int) -> dict:
        if not (isinstance(step, numbers.Integral) and step >= 0):
            raise ValueError(f"step={step!r}: must be an integer >= 0")
        epoch, k = divmod(int(step), self.steps_per_epoch)
        offset, order = self._epoch(epoch)
        B, T = self.batch_size, self.num_steps
        rows_B = np.arange(self.shard_index * self.local_batch_size,
                           (self.shard_index + 1) * self.local_batch_size)
        if self.partition == "random":
            starts_B = offset + T * order[k * B + rows_B]
        else:
            row_len = (len(self.ids) - offset - 1) // B
            starts_B = offset + rows_B * row_len + k * T
        positions_BxT = starts_B[:, None] + np.arange(T)
        return {"inputs": self.ids[positions_BxT], "targets": self.ids[positions_BxT + 1],
                "reset": self.partition == "random" or k == 0}


def eval_batches(ids, batch_size: int, num_steps: int) -> list[dict]:
    """The whole held-out stream as sequential minibatches with offset 0 (d2l
    `seq_data_iter_sequential` without the random discard), so evaluation can carry the state.

    The N - 1 (input, target) pairs are cut into B contiguous rows of ceil((N - 1) / B) pairs,
    then the rows are padded to a multiple of T columns. Padding only ever follows the real
    pairs of a row, so a carried state never reads padding before a real token; `weights` is
    1 for each real pair (every pair counted once) and 0 for padding.
    """
    _check_positive_int(batch_size=batch_size, num_steps=num_steps)
    ids = _as_ids(ids)
    num_pairs = len(ids) - 1
    if num_pairs < 1:
        raise ValueError(f"an evaluation stream of {len(ids)} tokens has no (input, target) pair")
    B, T = batch_size, num_steps
    row_len = math.ceil(num_pairs / B)
    num_batches = math.ceil(row_len / T)

    def rows(values, dtype):
        flat = np.zeros(B * row_len, dtype)
        flat[:num_pairs] = values
        return np.pad(flat.reshape(B, row_len), ((0, 0), (0, num_batches * T - row_len)))

    inputs_BxL, targets_BxL = rows(ids[:-1], np.int32), rows(ids[1:], np.int32)
    weights_BxL = rows(1.0, np.float32)
    columns = [slice(k * T, (k + 1) * T) for k in range(num_batches)]
    return [{"inputs": inputs_BxL[:, c], "targets": targets_BxL[:, c], "weights": weights_BxL[:, c],
             "reset": k == 0} for k, c in enumerate(columns)]


def check_sharding(batch_size, seed, shard_index, num_shards):
    """The arguments that every minibatch source takes: a global batch size that splits evenly
    over `num_shards` hosts, this host's `shard_index`, and a seed."""
    _check_positive_int(batch_size=batch_size, num_shards=num_shards)
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0):
        raise ValueError(f"seed={seed!r}: must be an integer >= 0")
    if batch_size % num_shards:
        raise ValueError(f"batch_size={batch_size} is not divisible by num_shards={num_shards}")
    if not (isinstance(shard_index, numbers.Integral) and 0 <= shard_index < num_shards):
        raise ValueError(f"shard_index={shard_index!r}: must be an integer in [0, {num_shards})")


def _as_ids(ids) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"token ids must be a 1-D stream, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    return ids.astype(np.int32)


def _check_positive_int(**values):
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
