r"""Memory of a BERT pretraining corpus larger than memory, prepared into ArrayRecord shards and
streamed through grain (`seqjax.data.streaming`).

    nice python benchmarks/streaming_memory.py             # a 2 GiB corpus
    python benchmarks/streaming_memory.py --size_gib=0.05  # the same on 50 MiB

The corpus is generated, never downloaded: copies of the shipped WikiText-2 training split,
each with its articles in a new random order, written in WikiText's layout into a temporary
directory until it holds --size_gib; the shipped split alone (one copy, 10.8 MB) is the
small corpus beside it. Each corpus is prepared by `launch.py --mode prepare`'s code
(`seqjax.tasks.prepare`) with experiments/bert_pretrain.py's config (its WordPiece tokenizer,
trained on the shipped split; 64-token sequences with next-sentence pairs; --dupe_factor
passes): the corpus is read, tokenized and written into shards a block of articles at a time.
Then the training minibatches a run with `config.data.shard_dir` reads (`shards.stream`, of
--batch_size rows) are streamed, --steps through grain's iterator (one thread reading ahead),
then --steps more by calls, one at a time. Last, the cost of one random read from a shard of
each corpus, in the two ways array_record offers: `read([i])` (grain's ArrayRecordDataSource)
and `read(i, i + 1)` (seqjax's ShardSource).

Prepare and stream each run in a fresh process (spawned), which reports its own peak resident
memory (`ru_maxrss`): the claim is that neither grows with the corpus. The shards were just
written, so the streaming reads come from the page cache, which is not resident memory of the
process; the rows/s are those of decompressing and decoding rows, not of a disk.
Everything generated is deleted at the end (--keep_dir keeps it, in --dir).
"""

import concurrent.futures
import multiprocessing
import os
import resource
import shutil
import tempfile
import time

from absl import app, flags

_SIZE = flags.DEFINE_float("size_gib", 2.0, "size of the generated corpus in GiB")
_DIR = flags.DEFINE_string("dir", None, "where to generate it (default: a new temporary dir)")
_KEEP = flags.DEFINE_bool("keep_dir", False, "keep the generated corpora and shards")
_DUPE = flags.DEFINE_integer("dupe_factor", 1, "passes over the corpus (bert_pretrain's: 2)")
_BATCH = flags.DEFINE_integer("batch_size", 256, "global minibatch")
_STEPS = flags.DEFINE_integer("steps", 2000, "minibatches streamed by each of the two ways")

GiB = 2**30


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _in_fresh_process(fn, *args):
    """fn(*args) in a new spawned process, so that its ru_maxrss is its own."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def generate(path: str, size: int) -> int:
    """Copies of the shipped training split, articles shuffled per copy, until `size` bytes;
    returns the number of copies."""
    import gzip
    import importlib.resources

    import numpy as np

    from seqjax.data.pretraining import ARTICLE
    raw = importlib.resources.files("seqjax.data").joinpath("wikitext2/wiki.train.tokens.gz")
    lines = gzip.decompress(raw.read_bytes()).decode("utf-8").splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if ARTICLE.match(line.rstrip("\n"))]
    articles = ["".join(lines[a:b]).encode("utf-8") for a, b in zip(starts, starts[1:] + [None])]
    rng, written, copies = np.random.default_rng(0), 0, 0
    with open(path, "wb") as f:
        while written < size:
            for i in rng.permutation(len(articles)):
                written += f.write(articles[i])
            copies += 1
    return copies


def _config(shard_dir: str, dupe_factor: int, batch_size: int):
    """experiments/bert_pretrain.py's config (its tokenizer, 64-token sequences with NSP), one
    pass over the corpus (--dupe_factor), streaming `shard_dir`."""
    from seqjax.config import load_experiment
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "bert_pretrain.py")
    config = load_experiment(path).get_config()
    config.data.update(dupe_factor=dupe_factor, batch_size=batch_size, shard_dir=shard_dir)
    return config


def prepare(corpus: str, out_dir: str, dupe_factor: int, batch_size: int) -> dict:
    """`launch.py --mode prepare --source corpus --out out_dir` on a fresh workdir."""
    from seqjax import tasks
    from seqjax.tasks import bert
    start = time.perf_counter()
    config = _config(out_dir, dupe_factor, batch_size)
    tokenizer, _ = bert.named_tokenizer(config, None)  # what prepare does first, timed apart
    tokenizer_s, tokenizer_peak = time.perf_counter() - start, _peak_mib()
    with tempfile.TemporaryDirectory() as workdir:  # the run's tokenizer, not trained again
        with open(os.path.join(workdir, bert.TOKENIZER_FILE), "w", encoding="utf-8") as f:
            f.write(tokenizer.to_str())
        manifest = tasks.prepare(config, workdir, [corpus], out_dir)
    return dict(rows=manifest["rows"], shards=len(manifest["shards"]),
                shard_bytes=sum(s["bytes"] for s in manifest["shards"]),
                tokenizer_s=tokenizer_s, tokenizer_peak_mib=tokenizer_peak,
                seconds=time.perf_counter() - start - tokenizer_s, peak_mib=_peak_mib())


def stream(shard_dir: str, dupe_factor: int, batch_size: int, steps: int):
    """The training minibatches a run with config.data.shard_dir reads (`shards.stream`)."""
    from seqjax.tasks import bert, shards
    imported = _peak_mib()
    config = _config(shard_dir, dupe_factor, batch_size)
    tokenizer, name = bert.named_tokenizer(config, None, shard_dir=shard_dir)
    batches = shards.stream(config, {bert.TOKENIZER_FILE: (tokenizer.to_str(), name)}, 0, 1)
    opened = _peak_mib()
    start = time.perf_counter()
    iterator = batches.iterate(0)
    for _ in range(steps):
        next(iterator)
    iterated_s = time.perf_counter() - start
    iterator.close()
    start = time.perf_counter()
    for step in range(steps, 2 * steps):
        batches(step)
    called_s = time.perf_counter() - start
    return dict(imported_mib=imported, opened_mib=opened, peak_mib=_peak_mib(),
                iterate_rows_s=steps * config.data.batch_size / iterated_s,
                call_rows_s=steps * config.data.batch_size / called_s,
                **_read_costs(batches.source))


def _read_costs(source, reads: int = 2000) -> dict:
    """Microseconds per random read of a row of the source's first shard, both ways."""
    import numpy as np
    from array_record.python import array_record_module

    from seqjax.data import streaming
    rows = source.manifest["shards"][0]["rows"]
    reader = array_record_module.ArrayRecordReader(
        str(source.paths[0]), streaming.READER_OPTIONS, file_reader_buffer_size=32768)
    positions = [int(i) for i in np.random.default_rng(0).integers(0, rows, reads)]
    costs = {}
    for name, read in (("list", lambda i: reader.read([i])),
                       ("range", lambda i: reader.read(i, i + 1))):
        start = time.perf_counter()
        for i in positions:
            read(i)
        costs[f"read_{name}_us"] = 1e6 * (time.perf_counter() - start) / reads
    reader.close()
    return dict(costs, shard_rows=rows)


def main(argv):
    del argv
    root = _DIR.value or tempfile.mkdtemp(prefix="seqjax-streaming-")
    import importlib.metadata

    import grain
    import numpy as np

    from common import environment, load_average
    print(f"working in {root}; " + environment(
        (grain, np), [f"array_record {importlib.metadata.version('array-record')}",
                      load_average()]), flush=True)
    try:
        os.makedirs(root, exist_ok=True)
        big = os.path.join(root, "big.wiki.train.tokens")
        start = time.perf_counter()
        copies = generate(big, int(_SIZE.value * GiB))
        print(f"generated {os.path.getsize(big) / GiB:.2f} GiB ({copies} shuffled copies of the "
              f"shipped split) in {time.perf_counter() - start:.0f} s", flush=True)
        small = os.path.join(root, "small.wiki.train.tokens")
        generate(small, 1)
        rows = []
        for name, corpus in (("shipped", small), ("generated", big)):
            shards = os.path.join(root, f"{name}-shards")
            p = _in_fresh_process(prepare, corpus, shards, _DUPE.value, _BATCH.value)
            print(f"{name}: prepared {p['rows']:,} rows into {p['shards']} shards of "
                  f"{p['shard_bytes'] / GiB:.2f} GiB in {p['seconds']:.0f} s (tokenizer "
                  f"{p['tokenizer_s']:.0f} s); peak RSS {p['peak_mib']:.0f} MiB "
                  f"({p['tokenizer_peak_mib']:.0f} MiB once the tokenizer is trained)",
                  flush=True)
            s = _in_fresh_process(stream, shards, _DUPE.value, _BATCH.value, _STEPS.value)
            print(f"{name}: streamed; peak RSS {s['peak_mib']:.0f} MiB", flush=True)
            rows.append((name, os.path.getsize(corpus), p, s))
        print("\n| corpus | text | rows | shards | prepare s | prepare peak RSS | stream RSS "
              "after imports / open / peak | rows/s iterator | rows/s calls |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, size, p, s in rows:
            print(f"| {name} | {size / GiB:.3f} GiB | {p['rows']:,} | {p['shards']} "
                  f"({p['shard_bytes'] / GiB:.2f} GiB) | {p['seconds']:.0f} | "
                  f"{p['peak_mib']:.0f} MiB | {s['imported_mib']:.0f} / {s['opened_mib']:.0f} / "
                  f"{s['peak_mib']:.0f} MiB | {s['iterate_rows_s']:,.0f} | "
                  f"{s['call_rows_s']:,.0f} |")
        print("\n| corpus | rows in the shard | read([i]) | read(i, i + 1) |")
        print("| --- | --- | --- | --- |")
        for name, _, _, s in rows:
            print(f"| {name} | {s['shard_rows']:,} | {s['read_list_us']:.1f} us | "
                  f"{s['read_range_us']:.1f} us |")
        print(f"done in {time.perf_counter() - start:.0f} s; {load_average()}")
    finally:
        if not _KEEP.value:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
