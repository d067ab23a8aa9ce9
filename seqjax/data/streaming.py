"""Corpora larger than memory: rows written once into ArrayRecord shards and read back through
grain by random access, as a pure function of (seed, step) like `batching.RowBatches`.

A shard directory holds `shard-NNNNN.array_record` files and `manifest.json`, written last, so
a directory without one is an unfinished write and is refused. The manifest gives each shard's
rows and bytes, the row layout (each array's name, little-endian dtype and shape per row) and
the writer's `metadata`: the tokenizer (its name and the SHA-256 of its JSON), the task and the
config keys the rows depend on, which a run checks against its own.

Why ArrayRecord: it is read by record index without scanning (its footer indexes every
record), each record is compressed (zstd) and checksummed on its own (`group_size:1`), so a
random read decompresses one row and a corrupt record is an error, never wrong data; and it is
grain's own format. grain orders the rows (an index shuffle that needs no array of the
corpus' size), cuts them into each process' minibatches and reads them ahead in threads.

A record is one row in a fixed layout: the raw little-endian bytes of its arrays in the
manifest's order (a NumPy structured dtype), not `np.savez` bytes. It is as portable (the
manifest spells out byte order, dtype and shape), carries no per-row header (a zip archive
costs hundreds of bytes per array, as much as a row of 64 int32 tokens), and decodes with one
`np.frombuffer`, no parsing.

Dimension letters: N rows in the shards, B global batch, b = B / num_shards a process' rows.
"""

import contextlib
import gzip
import hashlib
import io
import json
import numbers
import os
import re

import grain
import numpy as np
from array_record.python import array_record_module
from etils import epath

from seqjax import files
from seqjax.data.text import check_sharding, named_errors

MANIFEST = "manifest.json"
_FORMAT = ("seqjax.shards", 1)
_SHARD = re.compile(r"shard-\d{5}\.array_record")
_WRITER_OPTIONS = "group_size:1"  # one row per chunk: a random read decompresses one row
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # array_record's for random access
_KINDS = "biuf"  # bool, signed and unsigned integers, floats


def tokenizer_metadata(name: str, json_text: str) -> dict:
    """What shards record of the tokenizer that wrote them: its name and the SHA-256 of its
    JSON, so that a run with another tokenizer (even one of the same name) is refused."""
    return dict(name=name, sha256=hashlib.sha256(json_text.encode("utf-8")).hexdigest())


BLOCK_CHARS = 1 << 23  # characters of text tokenized at a time: memory stays flat


def text_blocks(path, *, block_chars: int = BLOCK_CHARS, starts_block=None):
    """The text of the UTF-8 file at `path` (gunzipped if it ends in `.gz`) in blocks of whole
    lines, one block in memory at a time: a block closes once it holds `block_chars`
    characters, before the next line for which `starts_block(line)` is true (any line by
    default), so that a record spread over lines (a WikiText article) stays in one block. A
    file with no such line in 4 x `block_chars` is an error, not a block that grows with it."""
    path = files.path(path).expanduser()
    starts_block = starts_block or (lambda line: True)
    lines, size = [], 0
    with named_errors(path, "text file"):
        with path.open("rb") as raw, (gzip.open(raw, "rt", encoding="utf-8")
                                      if path.suffix == ".gz"
                                      else io.TextIOWrapper(raw, encoding="utf-8")) as f:
            for line in f:
                if size >= block_chars and starts_block(line.rstrip("\n")):
                    yield "".join(lines)
                    lines, size = [], 0
                if size >= 4 * block_chars:
                    raise ValueError(f"{str(path)!r}: no line that may start a block in "
                                     f"{size:,} characters (a WikiText article's ' = Title = "
                                     f"' line): not in the layout its reader expects")
                lines.append(line)
                size += len(line)
    if lines:
        yield "".join(lines)


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------

def _row_layout(chunk: dict, where: str) -> list:
    """[name, dtype, row shape] of each array of a chunk of rows (a dict of equal-length
    arrays), dtypes little-endian."""
    if not isinstance(chunk, dict) or not chunk:
        raise ValueError(f"{where}: expected a non-empty dict of row arrays, got {type(chunk)}")
    layout, lengths = [], set()
    for name, a in chunk.items():
        a = np.asarray(a)
        if a.ndim == 0 or a.dtype.kind not in _KINDS:
            raise ValueError(f"{where}: array {name!r} of dtype {a.dtype} and shape {a.shape} is "
                             f"not rows of numbers")
        layout.append([name, a.dtype.newbyteorder("<").str, list(a.shape[1:])])
        lengths.add(len(a))
    if len(lengths) != 1:
        raise ValueError(f"{where}: arrays of different lengths: "
                         f"{ {k: len(a) for k, a in chunk.items()} }")
    return layout


def _struct(layout) -> np.dtype:
    return np.dtype([(name, dtype, tuple(shape)) for name, dtype, shape in layout])


def write_shards(rows_iter, out_dir, *, metadata: dict, rows_per_shard: int = 65_536,
                 extra_files: dict | None = None) -> dict:
    """Writes the rows of `rows_iter` (chunks: dicts of equal-length arrays, the layout the
    tasks' in-memory path makes) into ArrayRecord shards of `rows_per_shard` rows in
    `out_dir`, one record per row, holding one chunk in memory at a time; then the manifest,
    which it returns. `metadata` (JSON) is stored in it for `ShardSource.check_metadata`;
    `extra_files` ({name: text}: the tokenizer) are written beside the shards, before it.

    `out_dir` must be new, empty, or hold an unfinished write (shards without a manifest),
    whose shards are replaced; finished shards (a manifest) or other files are refused."""
    if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, numbers.Integral) \
            or rows_per_shard <= 0:
        raise ValueError(f"rows_per_shard={rows_per_shard!r}: must be a positive integer")
    metadata = json.loads(json.dumps(metadata))  # not JSON: an error now, not after the work
    out = local_dir(out_dir)
    extra_files = extra_files or {}
    _clear_unfinished(out, set(extra_files))
    out.mkdir(parents=True, exist_ok=True)
    layout, shards, writer, path, rows = None, [], None, None, 0

    def close_shard():
        writer.close()
        shards.append(dict(file=path.name, rows=rows, bytes=path.stat().length))

    try:
        for n, chunk in enumerate(rows_iter):
            where = f"chunk {n} of the rows for {out}"
            if layout is None:
                layout = _row_layout(chunk, where)
            elif _row_layout(chunk, where) != layout:
                raise ValueError(f"{where}: layout {_row_layout(chunk, where)} differs from the "
                                 f"first chunk's {layout}")
            records = np.empty(len(next(iter(chunk.values()))), _struct(layout))
            for name, a in chunk.items():
                records[name] = a
            for record in records:
                if writer is None:
                    path = out / f"shard-{len(shards):05d}.array_record"
                    writer, rows = array_record_module.ArrayRecordWriter(
                        str(path), _WRITER_OPTIONS), 0
                writer.write(record.tobytes())
                rows += 1
                if rows == rows_per_shard:
                    close_shard()
                    writer = None
        if writer is not None:
            close_shard()
            writer = None
    finally:
        if writer is not None:  # an error in flight: it, not the unfinished shard's, is raised
            with contextlib.suppress(RuntimeError):
                writer.close()
    if not shards:
        raise ValueError(f"no rows to write into {out}")
    manifest = dict(format=_FORMAT[0], version=_FORMAT[1], rows=sum(s["rows"] for s in shards),
                    arrays=layout, shards=shards, metadata=metadata)
    for name, text in extra_files.items():
        files.write_text(out / name, text)
    files.write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def local_dir(p) -> epath.Path:
    if not files.is_local(p):
        raise ValueError(f"{os.fspath(p)!r}: shards are read and written on this machine's disks "
                         f"only (array_record opens local files); copy them to one")
    return files.path(p).expanduser()


def _clear_unfinished(out: epath.Path, extra_names: set):
    if not out.exists():
        return
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out} already holds finished shards ({MANIFEST}); remove it to "
                              f"write them again")
    names = [p.name for p in out.iterdir()]
    ours = {MANIFEST, *extra_names}
    others = [n for n in names if not (_SHARD.fullmatch(n) or n in extra_names or any(
        files.is_temporary(n, name) for name in ours))]
    if others:
        raise FileExistsError(f"{out} holds files other than shards ({sorted(others)[:5]}); "
                              f"write shards into a new or empty directory")
    for name in names:
        (out / name).unlink()


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------

def read_manifest(shard_dir) -> dict:
    """The manifest of a finished shard directory, with errors that say what is wrong."""
    d = local_dir(shard_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"shard directory {str(d)!r} does not exist")
    names = sorted(p.name for p in d.iterdir())
    if not names:
        raise ValueError(f"shard directory {str(d)!r} is empty: prepare the corpus into it first")
    if MANIFEST not in names:
        shards = [n for n in names if _SHARD.fullmatch(n)]
        raise ValueError(f"shard directory {str(d)!r} has no {MANIFEST}: " + (
            f"{len(shards)} shards of an unfinished or interrupted write; prepare it again"
            if shards else f"not a shard directory (it holds {names[:5]})"))
    try:
        manifest = json.loads(files.read_text(d / MANIFEST))
        ok = (manifest["format"], manifest["version"]) == _FORMAT
        _struct(manifest["arrays"])
        counts = [(s["file"], int(s["rows"]), int(s["bytes"])) for s in manifest["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(d / MANIFEST)!r} is not a shard manifest ({e!r})") from None
    if not ok or not counts:
        raise ValueError(f"{str(d / MANIFEST)!r} is not a version-{_FORMAT[1]} {_FORMAT[0]} "
                         f"manifest with shards")
    listed = {name for name, _, _ in counts}
    missing = sorted(listed - set(names))
    extra = sorted(n for n in names if _SHARD.fullmatch(n) and n not in listed)
    if missing or extra:
        raise ValueError(f"the shards in {str(d)!r} do not match its {MANIFEST}: "
                         f"missing {missing[:5]}, not listed {extra[:5]}")
    return manifest


class ShardSource:
    """A grain `RandomAccessDataSource` of the rows of a shard directory: item i is row i (a
    dict of arrays), and `rows(indices)` reads several at once. Opening checks the manifest
    and every shard's size and record count, and keeps a reader of each shard open (its
    index in memory: ~8 bytes a row); a read that finds a corrupt record raises a
    ValueError naming the shard file.

    Not grain's ArrayRecordDataSource: its reads (`reader.read([position])`) cost time that
    grows with the records in the shard, where `reader.read(position, position + 1)` does not
    (`benchmarks/streaming_memory.py` measures both; figures in `benchmarks/README.md`)."""

    def __init__(self, shard_dir):
        self.shard_dir = local_dir(shard_dir)
        self.manifest = read_manifest(self.shard_dir)
        # Which rows these are: a run resumed on other shards (prepared again) is refused.
        self.fingerprint = hashlib.sha256(
            json.dumps(self.manifest, sort_keys=True).encode("utf-8")).hexdigest()
        self.layout = _struct(self.manifest["arrays"])
        self.paths = [self.shard_dir / s["file"] for s in self.manifest["shards"]]
        self._readers = [_open_shard(path, s["rows"], s["bytes"])
                         for path, s in zip(self.paths, self.manifest["shards"])]
        rows = np.array([s["rows"] for s in self.manifest["shards"]])
        self._ends = np.cumsum(rows)
        self._starts = self._ends - rows

    @property
    def metadata(self) -> dict:
        return self.manifest["metadata"]

    def check_metadata(self, expected: dict):
        """Refuses shards written with other `metadata` (a JSON dict) than `expected`, naming
        both values of each key that differs (keys of the shards' that `expected` lacks are
        not compared)."""
        expected = json.loads(json.dumps(expected))
        differ = [f"{key}: the shards' {self.metadata.get(key)!r}, this run's {value!r}"
                  for key, value in expected.items() if self.metadata.get(key) != value]
        if differ:
            raise ValueError(f"the shards in {str(self.shard_dir)!r} were written for another "
                             f"run than this one; " + "; ".join(differ)
                             + ". Prepare them again with this run's tokenizer and config.")

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index) -> dict:
        return {name: a[0] for name, a in self.rows([index]).items()}

    def rows(self, indices) -> dict:
        """Rows `indices` as a dict of [len(indices), ...] arrays, in native byte order."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and not (0 <= indices.min() and indices.max() < len(self)):
            raise IndexError(f"rows {indices.min()}..{indices.max()} are not all in "
                             f"[0, {len(self)}) of {str(self.shard_dir)!r}")
        shards = np.searchsorted(self._ends, indices, side="right")
        positions = indices - self._starts[shards]
        records = []
        for shard, position in zip(shards.tolist(), positions.tolist()):
            try:
                record, = self._readers[shard].read(position, position + 1)
            except RuntimeError as e:  # riegeli's: a chunk's hash mismatch, a bad header, ...
                raise ValueError(f"corrupt shard {str(self.paths[shard])!r}: {e}") from e
            if len(record) != self.layout.itemsize:
                raise ValueError(f"corrupt shard {str(self.paths[shard])!r}: a record of "
                                 f"{len(record)} bytes, the manifest's rows have "
                                 f"{self.layout.itemsize}")
            records.append(record)
        table = np.frombuffer(b"".join(records), self.layout)
        return {name: np.ascontiguousarray(table[name], table.dtype[name].base.newbyteorder("="))
                for name in table.dtype.names}


def _open_shard(path: epath.Path, rows: int, size: int):
    """A reader for random access (no read-ahead, as grain's) of a shard that matches its
    manifest entry."""
    actual = path.stat().length
    if actual != size:
        raise ValueError(f"corrupt shard {str(path)!r}: {actual} bytes, its manifest says {size} "
                         f"(truncated or overwritten)")
    reader = array_record_module.ArrayRecordReader(
        str(path), READER_OPTIONS, file_reader_buffer_size=32768)
    if reader.ok() and reader.num_records() == rows:
        return reader
    try:
        reader.read([0])
        why = f"{reader.num_records()} records, its manifest says {rows}"
    except RuntimeError as e:
        why = str(e)
    with contextlib.suppress(RuntimeError):  # closing a failed reader raises its error again
        reader.close()
    raise ValueError(f"corrupt shard {str(path)!r}: {why}")


# ---------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------

class StreamBatches:
    """Training minibatches of the rows of a shard directory, as `batching.RowBatches` makes
    them of arrays in memory: minibatch k of epoch step // steps_per_epoch is rows [kB, (k+1)B)
    of that epoch's shuffle (the last partial minibatch of an epoch is left out), and process
    `shard_index` of `num_shards` gets rows [ib, (i+1)b) of it and reads only those.

    Built on grain's MapDataset of the row indices, lazily: a shuffle whose epoch e is seeded
    by (s + e) mod 2^32, s drawn from `seed` (so that neighbouring seeds do not replay each
    other's epochs one epoch apart), cut to whole minibatches, batched by b, each process'
    b-row batches taken with a stride of num_shards, and their rows read
    (`ShardSource.rows`). grain carries the epoch through every index, so the stream is a
    pure function of (seed, step), and no index array of the corpus' size is ever built. The
    orders differ from RowBatches' (grain's index shuffle, not NumPy's permutation).

    `iterate(start)` is the same stream as a grain iterator that reads ahead in
    `num_threads` threads, `prefetch` minibatches ahead. Threads, not grain's worker
    processes (`mp_prefetch`): a row costs ~30 us of Python under the GIL (grain's index
    pipeline and the read), so one thread reading ahead already overlaps the device step, which
    releases the GIL; more threads only contend on 2 cores (they help where reads wait on a
    disk or network), and each worker process would hold its own copy of the interpreter, of
    JAX and of the shards' indexes. `metadata` is checked against the shards'
    (`ShardSource.check_metadata`)."""

    def __init__(self, shard_dir, batch_size: int, *, seed: int = 0, shard_index: int = 0,
                 num_shards: int = 1, metadata: dict | None = None, what: str = "rows",
                 transform=None, num_threads: int = 1, prefetch: int = 4):
        check_sharding(batch_size, seed, shard_index, num_shards)
        self.source = ShardSource(shard_dir)
        if metadata is not None:
            self.source.check_metadata(metadata)
        self.num_rows = len(self.source)
        if self.num_rows < batch_size:
            raise ValueError(f"{self.num_rows} training {what} in {str(self.source.shard_dir)!r} "
                             f"are too few for one minibatch of batch_size={batch_size}")
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = self.num_rows // batch_size
        shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
        order = grain.MapDataset.range(self.num_rows).shuffle(seed=shuffle_seed)
        local_rows = (order[:self.steps_per_epoch * batch_size].batch(batch_size // num_shards)
                      [shard_index::num_shards].repeat())
        self.dataset = local_rows.map(self.source.rows)
        if transform is not None:  # a batch of rows -> the model's batch (teacher forcing)
            self.dataset = self.dataset.map(transform)
        self.read_options = grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch)

    @property
    def fingerprint(self) -> str:
        return self.source.fingerprint

    def __call__(self, step: int) -> dict:
        if not (isinstance(step, numbers.Integral) and step >= 0):
            raise ValueError(f"step={step!r}: must be an integer >= 0")
        return self.dataset[int(step)]

    def iterate(self, start_step: int = 0) -> grain.DatasetIterator:
        """The minibatches of steps start_step, start_step + 1, ... read ahead in background
        threads. Its `get_state()`, `{'next_index': step}`, is the position to save with a
        checkpoint; `set_state()` of it resumes there."""
        iterator = iter(self.dataset.to_iter_dataset(self.read_options))
        iterator.set_state({"next_index": int(start_step)})
        return iterator
