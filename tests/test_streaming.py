"""seqjax.data.streaming: rows written into ArrayRecord shards come back through grain with
RowBatches' semantics (every row once per epoch, the per-process split composes to the global
batch, a pure function of the step), grain's iterator resumes exactly from its saved state,
and bad shard directories are refused with errors that name what is wrong."""

import gzip
import json

import numpy as np
import pytest

from seqjax.data import streaming

N, L = 203, 6  # rows, tokens per row
TOKENIZER = streaming.tokenizer_metadata("tokenizer.json", '{"vocab": "ours"}')


def _rows(n=N):
    """Rows whose every array says which row it is, so a batch can be checked row by row."""
    row = np.arange(n)
    return dict(tokens=(row[:, None] * L + np.arange(L)).astype(np.int32), row=row.astype(np.int64),
                weight=(row / n).astype(np.float32), flag=row % 3 == 0)


def _chunks(rows, size):
    n = len(rows["row"])
    return ({k: a[i:i + size] for k, a in rows.items()} for i in range(0, n, size))


def _write(path, rows=None, *, chunk=37, rows_per_shard=50, metadata=None):
    rows = _rows() if rows is None else rows
    return streaming.write_shards(_chunks(rows, chunk), path, rows_per_shard=rows_per_shard,
                                  metadata=dict(tokenizer=TOKENIZER) if metadata is None
                                  else metadata)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards") / "train"
    _write(path)
    return path


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- writing and reading


def test_rows_read_back_as_written(shards):
    manifest = json.loads((shards / streaming.MANIFEST).read_text())
    assert [s["rows"] for s in manifest["shards"]] == [50, 50, 50, 50, 3]
    assert manifest["rows"] == N and manifest["metadata"] == dict(tokenizer=TOKENIZER)
    source = streaming.ShardSource(shards)
    rows = _rows()
    assert len(source) == N
    with pytest.raises(IndexError, match=f"not all in \\[0, {N}\\)"):
        source.rows([0, N])
    for i in (0, 49, 50, 202):
        row = source[i]
        for name, a in rows.items():
            assert np.array_equal(row[name], a[i]) and row[name].dtype == a.dtype


def test_batches_keep_dtypes_and_shapes(shards):
    batch = streaming.StreamBatches(shards, 8, seed=0)(0)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "tokens": ((8, L), np.int32), "row": ((8,), np.int64), "weight": ((8,), np.float32),
        "flag": ((8,), np.bool_)}
    expected = _rows()
    assert _equal(batch, {k: a[batch["row"]] for k, a in expected.items()})


def test_text_blocks_cut_before_a_starting_line(tmp_path):
    lines = [f" = Article {i} = \n" if i % 4 == 0 else f"line {i} é\n" for i in range(40)]
    text = "".join(lines)
    (tmp_path / "plain.txt").write_text(text, encoding="utf-8")
    (tmp_path / "packed.txt.gz").write_bytes(gzip.compress(text.encode("utf-8")))
    for name in ("plain.txt", "packed.txt.gz"):
        blocks = list(streaming.text_blocks(tmp_path / name, block_chars=30,
                                            starts_block=lambda line: line.startswith(" = ")))
        assert "".join(blocks) == text and len(blocks) == 10
        assert all(b.startswith(" = Article") for b in blocks)
    assert list(streaming.text_blocks(tmp_path / "plain.txt", block_chars=1)) == lines


# ---------------------------------------------------------------- RowBatches' semantics


def test_every_row_once_per_epoch_and_epochs_differ(shards):
    batches = streaming.StreamBatches(shards, 16, seed=1)
    steps = batches.steps_per_epoch
    assert steps == N // 16
    epochs = [np.concatenate([batches(e * steps + k)["row"] for k in range(steps)])
              for e in range(3)]
    for rows in epochs:
        assert len(rows) == steps * 16 and len(set(rows.tolist())) == len(rows)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    other_seed = streaming.StreamBatches(shards, 16, seed=2)
    assert not np.array_equal(other_seed(0)["row"], batches(0)["row"])


def test_pure_function_of_seed_and_step(shards):
    a = streaming.StreamBatches(shards, 8, seed=5)
    b = streaming.StreamBatches(shards, 8, seed=5)
    steps = [40, 3, 77, 3, 0, 40]
    assert all(_equal(a(s), b(s)) for s in steps)
    with pytest.raises(ValueError, match="step=-1"):
        a(-1)


@pytest.mark.parametrize("num_shards", [2, 4])
def test_process_split_composes_to_the_global_batch(shards, num_shards):
    whole = streaming.StreamBatches(shards, 8, seed=3)
    parts = [streaming.StreamBatches(shards, 8, seed=3, shard_index=i, num_shards=num_shards)
             for i in range(num_shards)]
    for step in (0, 7, whole.steps_per_epoch + 2, 10 * whole.steps_per_epoch):
        local = [p(step) for p in parts]
        assert all(len(b["row"]) == 8 // num_shards for b in local)
        assert _equal({k: np.concatenate([b[k] for b in local]) for k in local[0]}, whole(step))


def test_iterator_from_a_step_equals_the_calls(shards):
    batches = streaming.StreamBatches(shards, 8, seed=0, num_threads=2, prefetch=3)
    iterator = batches.iterate(20)
    try:
        for step in range(20, 20 + 2 * batches.steps_per_epoch):
            assert _equal(next(iterator), batches(step))
        assert iterator.get_state() == {"next_index": 20 + 2 * batches.steps_per_epoch}
    finally:
        iterator.close()


def test_saved_iterator_state_resumes_exactly(shards):
    """train(2n) equals train(n) + resume(n): a fresh StreamBatches (as a new process would
    build) whose iterator is set to the JSON-saved state yields the next batches bit for bit."""
    n = 9
    first = streaming.StreamBatches(shards, 8, seed=4, shard_index=1, num_shards=2)
    iterator = first.iterate(0)
    head = [next(iterator) for _ in range(n)]
    saved = json.loads(json.dumps(iterator.get_state()))
    tail = [next(iterator) for _ in range(n)]
    iterator.close()

    resumed = streaming.StreamBatches(shards, 8, seed=4, shard_index=1, num_shards=2).iterate(0)
    resumed.set_state(saved)
    again = [next(resumed) for _ in range(n)]
    resumed.close()
    assert saved == {"next_index": n}
    assert all(_equal(a, b) for a, b in zip(tail, again))
    assert all(_equal(a, first(s)) for s, a in enumerate(head + tail))


# ---------------------------------------------------------------- bad input


def test_missing_and_empty_directories_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        streaming.ShardSource(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="'gs://bucket/shards': .* this machine's disks"):
        streaming.ShardSource("gs://bucket/shards")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        streaming.StreamBatches(tmp_path / "empty", 8)


def test_an_interrupted_write_is_not_taken_for_a_finished_one(tmp_path):
    def killed():
        yield from _chunks(_rows(), 60)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        streaming.write_shards(killed(), tmp_path, rows_per_shard=50, metadata={})
    assert any(tmp_path.glob("shard-*.array_record"))
    with pytest.raises(ValueError, match="unfinished or interrupted"):
        streaming.ShardSource(tmp_path)
    (tmp_path / f".{streaming.MANIFEST}.123.tmp").write_text("{")  # killed while writing it
    _write(tmp_path, rows_per_shard=100)  # a rerun replaces the unfinished write
    assert len(streaming.ShardSource(tmp_path)) == N
    with pytest.raises(FileExistsError, match="already holds finished shards"):
        _write(tmp_path)


def test_a_directory_with_other_files_is_not_written_into(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        _write(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_shards_of_another_tokenizer_are_refused_naming_both(shards):
    theirs = streaming.tokenizer_metadata("src_tokenizer.json", '{"vocab": "other"}')
    with pytest.raises(ValueError) as e:
        streaming.StreamBatches(shards, 8, metadata=dict(tokenizer=theirs))
    message = str(e.value)
    for value in (TOKENIZER["name"], TOKENIZER["sha256"], theirs["name"], theirs["sha256"]):
        assert value in message
    assert str(shards) in message
    streaming.StreamBatches(shards, 8, metadata=dict(tokenizer=TOKENIZER))


def test_manifest_and_files_that_disagree_are_refused(tmp_path):
    _write(tmp_path)
    (tmp_path / "shard-00004.array_record").rename(tmp_path / "shard-00009.array_record")
    with pytest.raises(ValueError, match=r"missing \['shard-00004.*not listed \['shard-00009"):
        streaming.ShardSource(tmp_path)


@pytest.mark.parametrize("damage, why", [
    (lambda data: data[:5000], "truncated"),
    (lambda data: np.random.default_rng(0).bytes(len(data)), "hash mismatch")])
def test_a_damaged_shard_is_refused_on_open_naming_it(tmp_path, damage, why):
    _write(tmp_path)
    path = tmp_path / "shard-00002.array_record"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=f"corrupt shard '{path}'.*{why}"):
        streaming.StreamBatches(tmp_path, 8)


def test_a_corrupt_record_is_an_error_naming_the_shard(tmp_path):
    """Bytes flipped inside a shard's records (its size unchanged) fail the record's checksum
    when it is read; the shard directory is left as it was."""
    _write(tmp_path)
    path = tmp_path / "shard-00001.array_record"
    data = bytearray(path.read_bytes())
    data[200:260] = bytes(b ^ 0xFF for b in data[200:260])
    path.write_bytes(bytes(data))
    listing = sorted(p.name for p in tmp_path.iterdir())
    source = streaming.ShardSource(tmp_path)
    with pytest.raises(ValueError, match=f"corrupt shard '{path}'"):
        for i in range(50, 100):
            source[i]
    batches = streaming.StreamBatches(tmp_path, 8)
    with pytest.raises(ValueError, match=f"corrupt shard '{path}'"):
        for step in range(batches.steps_per_epoch):
            batches(step)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_chunks_must_share_one_layout_of_numbers(tmp_path):
    rows = _rows()
    odd = [{k: a[:10] for k, a in rows.items()}, {"tokens": rows["tokens"][10:20]}]
    with pytest.raises(ValueError, match="chunk 1 .* differs from the first chunk"):
        streaming.write_shards(iter(odd), tmp_path / "a", metadata={})
    with pytest.raises(ValueError, match="different lengths"):
        streaming.write_shards(iter([dict(a=np.zeros(3), b=np.zeros(4))]), tmp_path / "b",
                               metadata={})
    with pytest.raises(ValueError, match="not rows of numbers"):
        streaming.write_shards(iter([dict(a=np.array(["x", "y"]))]), tmp_path / "c", metadata={})
    with pytest.raises(ValueError, match="no rows"):
        streaming.write_shards(iter([]), tmp_path / "d", metadata={})
    _write(tmp_path / "e", _rows(5))
    with pytest.raises(ValueError, match="too few for one minibatch"):
        streaming.StreamBatches(tmp_path / "e", 8)
