"""seqjax.data.text: preprocessing, vocabulary and LM minibatches, checked against the corpus
array itself (every batch row must be a literal slice of the stream)."""

import json
import string

import numpy as np
import pytest

from seqjax.data import text as text_lib


@pytest.fixture(scope="module")
def corpus_text():
    return text_lib.load_text()


def _stream(n=2000, vocab_size=10_000):
    # Distinct-ish ids make "is this a slice of the corpus" checks unambiguous.
    return (np.arange(n) * 7919 % vocab_size).astype(np.int32)


def _positions(ids, row):
    """Start of `row` as a contiguous slice of `ids` (asserting it is one)."""
    n = len(row)
    windows = np.lib.stride_tricks.sliding_window_view(ids, n)
    hits = np.flatnonzero((windows == row).all(axis=1))
    assert hits.size >= 1, "row is not a contiguous slice of the corpus"
    return hits


# ---------------------------------------------------------------- text


def test_preprocess_letters_and_raw():
    text = "The  Time-Machine, 1895!\n\nBy H.G. Wells\t"
    assert text_lib.preprocess(text) == "the time machine by h g wells "
    assert text_lib.preprocess("123abc") == " abc"
    assert text_lib.preprocess(text, "raw") == text
    with pytest.raises(ValueError, match="letters"):
        text_lib.preprocess(text, "lower")


def test_shipped_corpus(corpus_text):
    assert len(corpus_text) > 170_000
    assert corpus_text.startswith("The Time Machine, by H. G. Wells")
    letters = text_lib.preprocess(corpus_text)
    assert set(letters) == set(string.ascii_lowercase + " ")
    assert "  " not in letters


def test_tokenize():
    assert text_lib.tokenize("ab c") == ["a", "b", " ", "c"]
    assert text_lib.tokenize(" the  time\nmachine ", "word") == ["the", "time", "machine"]
    with pytest.raises(ValueError, match="char"):
        text_lib.tokenize("x", "byte")


def test_load_text_user_file_and_errors(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("héllo world\n", encoding="utf-8")
    assert text_lib.load_text(good) == text_lib.load_text(str(good)) == "héllo world\n"
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        text_lib.load_text(missing)
    for name, content in (("empty.txt", ""), ("blank.txt", " \n\t\n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=name):
            text_lib.load_text(tmp_path / name)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*not UTF-8"):
        text_lib.load_text(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="is a directory"):
        text_lib.load_text(tmp_path)


# ---------------------------------------------------------------- vocabulary


def test_vocab_order_reserved_and_min_freq():
    tokens = list("aaaabbbcccdde")  # a:4, b:3, c:3, d:2, e:1
    vocab = text_lib.Vocab(tokens, min_freq=2, reserved_tokens=["<pad>", "<bos>"])
    assert vocab.unk == 0 and vocab["<unk>"] == 0
    assert vocab.idx_to_token == ["<unk>", "<pad>", "<bos>", "a", "b", "c", "d"]  # b < c on a tie
    assert len(vocab) == 7
    assert vocab["e"] == vocab["zzz"] == 0  # below min_freq, and never seen
    assert vocab[["a", "e", "d"]] == [3, 0, 6]
    assert vocab.token_freqs == [("a", 4), ("b", 3), ("c", 3), ("d", 2), ("e", 1)]
    # Ties are broken by the token, not by corpus order.
    assert text_lib.Vocab(list("ba")).idx_to_token == text_lib.Vocab(list("ab")).idx_to_token
    with pytest.raises(ValueError):
        text_lib.Vocab(tokens, reserved_tokens=["<unk>"])


def test_vocab_round_trips():
    tokens = text_lib.tokenize(text_lib.preprocess("The Time Traveller (for so it will be..."))
    vocab = text_lib.Vocab(tokens, reserved_tokens=["<pad>"])
    ids = vocab.encode(tokens)
    assert ids.dtype == np.int32 and ids.shape == (len(tokens),)
    assert vocab.to_tokens(ids) == tokens
    assert vocab.to_tokens(ids.tolist()) == tokens
    assert vocab.to_tokens(int(ids[0])) == tokens[0] == vocab.to_tokens(ids[0])
    with pytest.raises(IndexError):
        vocab.to_tokens(len(vocab))
    restored = text_lib.Vocab.from_json(vocab.to_json())
    assert restored == vocab
    assert restored.idx_to_token == vocab.idx_to_token and restored.token_freqs == vocab.token_freqs
    np.testing.assert_array_equal(restored.encode(tokens), ids)
    json.loads(vocab.to_json())
    with pytest.raises(ValueError, match="malformed|seqjax"):
        text_lib.Vocab.from_json('{"idx_to_token": ["a"]}')


def test_split_train_valid():
    ids = np.arange(100)
    train, valid = text_lib.split_train_valid(ids, 0.1)
    np.testing.assert_array_equal(train, np.arange(90))
    np.testing.assert_array_equal(valid, np.arange(90, 100))
    for bad in (0, 1, 1.5, -0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="valid_fraction"):
            text_lib.split_train_valid(ids, bad)


# ---------------------------------------------------------------- minibatches


def test_random_partition_is_a_shuffled_cut_of_the_corpus():
    ids = _stream()
    B, T = 4, 7
    batches = text_lib.LMBatches(ids, B, T, partition="random", seed=3)
    spe = batches.steps_per_epoch
    assert spe == (len(ids) - T) // T // B
    for epoch in range(3):
        starts = []
        for k in range(spe):
            batch = batches(epoch * spe + k)
            assert batch["inputs"].shape == batch["targets"].shape == (B, T)
            assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
            assert batch["reset"] is True
            for x, y in zip(batch["inputs"], batch["targets"]):
                (start,) = _positions(ids, x)
                np.testing.assert_array_equal(y, ids[start + 1:start + T + 1])
                starts.append(start)
        # Disjoint slices on one grid: same offset mod T, no start repeated.
        assert len(set(starts)) == len(starts)
        assert len({s % T for s in starts}) == 1 and max(starts) + T < len(ids)
        assert sorted(starts) != starts  # shuffled


def test_batches_are_a_pure_function_of_seed_and_step():
    ids = _stream()
    a = text_lib.LMBatches(ids, 4, 7, seed=0)
    b = text_lib.LMBatches(ids, 4, 7, seed=0)
    first = a(5)
    a(123)  # a different epoch in between must not matter
    for other in (a(5), b(5)):
        np.testing.assert_array_equal(first["inputs"], other["inputs"])
        np.testing.assert_array_equal(first["targets"], other["targets"])
    assert not np.array_equal(first["inputs"], text_lib.LMBatches(ids, 4, 7, seed=1)(5)["inputs"])
    with pytest.raises(ValueError, match="step"):
        a(-1)


def test_sequential_partition_continues_rows():
    ids = _stream()
    B, T = 3, 5
    batches = text_lib.LMBatches(ids, B, T, partition="sequential", seed=1)
    spe = batches.steps_per_epoch
    assert spe == (len(ids) - T) // B // T
    for epoch in range(3):
        epoch_batches = [batches(epoch * spe + k) for k in range(spe)]
        assert [b["reset"] for b in epoch_batches] == [True] + [False] * (spe - 1)
        rows = np.concatenate([b["inputs"] for b in epoch_batches], axis=1)
        targets = np.concatenate([b["targets"] for b in epoch_batches], axis=1)
        starts = [int(_positions(ids, row)[0]) for row in rows]  # each row is one contiguous slice
        assert starts[0] < T and starts == sorted(starts)
        assert all(b - a >= spe * T for a, b in zip(starts, starts[1:]))  # rows do not overlap
        for start, row_targets in zip(starts, targets):
            np.testing.assert_array_equal(row_targets, ids[start + 1:start + 1 + spe * T])
        for before, after in zip(epoch_batches, epoch_batches[1:]):
            # The token after row i's last target ... is where row i of the next batch starts.
            np.testing.assert_array_equal(after["inputs"][:, 0], before["targets"][:, -1])


def test_sharding_splits_the_global_batch():
    ids = _stream()
    for partition in text_lib.PARTITIONS:
        full = text_lib.LMBatches(ids, 8, 5, partition=partition, seed=2)
        shards = [text_lib.LMBatches(ids, 8, 5, partition=partition, seed=2, shard_index=i,
                                     num_shards=4)
                  for i in range(4)]
        assert all(s.steps_per_epoch == full.steps_per_epoch for s in shards)
        for step in (0, 3, full.steps_per_epoch + 1):
            for key in ("inputs", "targets"):
                np.testing.assert_array_equal(np.concatenate([s(step)[key] for s in shards]),
                                              full(step)[key])
    with pytest.raises(ValueError, match="divisible"):
        text_lib.LMBatches(ids, 6, 5, num_shards=4)


def test_batch_argument_errors():
    ids = _stream(100)
    with pytest.raises(ValueError, match="need at least 60 tokens") as err:
        text_lib.LMBatches(ids[:59], 5, 10)
    assert "59" in str(err.value)
    text_lib.LMBatches(ids[:60], 5, 10)  # exactly enough
    for partition in text_lib.PARTITIONS:
        assert text_lib.LMBatches(ids[:60], 5, 10, partition=partition).steps_per_epoch == 1
    with pytest.raises(ValueError, match="partition"):
        text_lib.LMBatches(ids, 2, 3, partition="shuffled")
    for kwargs in ({"batch_size": 0, "num_steps": 3}, {"batch_size": 2, "num_steps": 2.5},
                   {"batch_size": True, "num_steps": 3}):
        with pytest.raises(ValueError, match="positive integer"):
            text_lib.LMBatches(ids, **kwargs)


@pytest.mark.parametrize("n,B,T", [(101, 4, 7), (9, 4, 3), (2, 3, 5), (57, 1, 8)])
def test_eval_batches_cover_every_pair_once(n, B, T):
    ids = _stream(n) + 1  # no id 0, so padding is recognisable
    batches = text_lib.eval_batches(ids, B, T)
    assert [b["reset"] for b in batches] == [True] + [False] * (len(batches) - 1)
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (B, T)
        assert b["inputs"].dtype == np.int32 and b["weights"].dtype == np.float32
    assert sum(b["weights"].sum() for b in batches) == n - 1
    inputs = np.concatenate([b["inputs"] for b in batches], axis=1)
    targets = np.concatenate([b["targets"] for b in batches], axis=1)
    weights = np.concatenate([b["weights"] for b in batches], axis=1)
    real = weights == 1
    # Row-major order of the real pairs is the stream itself: contiguous rows, padding at row ends.
    np.testing.assert_array_equal(inputs[real], ids[:-1])
    np.testing.assert_array_equal(targets[real], ids[1:])
    assert (inputs[~real] == 0).all() and (weights[~real] == 0).all()
    for row in real:  # no padding before a real pair within a row
        assert not (np.diff(row.astype(int)) > 0).any()
    with pytest.raises(ValueError, match="pair"):
        text_lib.eval_batches(ids[:1], B, T)


def test_end_to_end_on_the_corpus(corpus_text):
    tokens = text_lib.tokenize(text_lib.preprocess(corpus_text))
    vocab = text_lib.Vocab(tokens)
    assert len(vocab) == 28 and vocab.idx_to_token[:3] == ["<unk>", " ", "e"]
    train, valid = text_lib.split_train_valid(vocab.encode(tokens), 0.1)
    batches = text_lib.LMBatches(train, 32, 35, partition="sequential")
    batch = batches(batches.steps_per_epoch + 2)
    assert ("".join(vocab.to_tokens(batch["inputs"][0, 1:]))
            == "".join(vocab.to_tokens(batch["targets"][0, :-1])))
    assert sum(b["weights"].sum() for b in text_lib.eval_batches(valid, 16, 35)) == len(valid) - 1
