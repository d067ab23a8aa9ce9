"""Training corpora streamed from shards (`--mode prepare`, `config.data.shard_dir`): BERT
pretraining and translation read the rows the in-memory path makes; a resumed run equals an
uninterrupted one bit for bit, two processes equal one, and bad shard directories are refused
with nothing in the workdir lost."""

import json

import jax
import numpy as np
import pytest
from test_multihost import _run_two_processes

from seqjax import tasks
from seqjax.data import streaming
from seqjax.tasks import shards
from seqjax.train.loop import train_and_evaluate

from conftest import ROOT, launch, load_config, restored

SOURCE = str(ROOT / "seqjax" / "data" / "wikitext2" / "wiki.valid.tokens.gz")


def _config(shard_dir, **overrides):
    config = load_config("bert_pretrain", "smoke")
    config.data.shard_dir = str(shard_dir)
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "shards"
    run = launch("--config", "experiments/bert_pretrain.py:smoke", "--mode", "prepare",
                 "--workdir", str(out.parent / "unused"), "--source", SOURCE, "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "train on them with --config.data.shard_dir" in run.stdout
    return out


def _same_state(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_prepared_rows_are_the_in_memory_rows_of_each_block(shard_dir, tmp_path):
    config = _config(shard_dir)
    source = streaming.ShardSource(shard_dir)
    ((tokenizer_json, _),) = shards.shard_tokenizers(shard_dir, ["tokenizer.json"]).values()
    from seqjax.data import pretraining as data_lib
    from seqjax.tasks import bert
    tokenizer = data_lib.tokenizer_from_json(tokenizer_json, "the shards' tokenizer")
    (documents,) = list(shards.document_blocks([SOURCE]))  # one block: a small file
    expected = bert.train_rows(config, tokenizer, documents, seed=(config.seed, 0))
    assert len(source) == len(expected["tokens"])
    got = source.rows(np.arange(len(source)))
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array)


def test_resume_is_bit_identical_with_the_stream_position_in_the_checkpoint(shard_dir,
                                                                          tmp_path):
    config = _config(shard_dir)
    once, twice = tmp_path / "once", tmp_path / "twice"
    train_and_evaluate(config, str(once))
    assert train_and_evaluate(config, str(twice), stop_after=2)["step"] == 2
    from seqjax.train.checkpoint import Checkpoints
    ckpts = Checkpoints(str(twice))
    saved = ckpts.meta("latest")["data"]
    assert saved == dict(position={"next_index": 2},
                         source=streaming.ShardSource(shard_dir).fingerprint)
    ckpts.close()
    train_and_evaluate(config, str(twice))
    _same_state(restored(once), restored(twice))


def test_two_processes_equal_one_with_four_devices(shard_dir, tmp_path):
    config = _config(shard_dir)
    single, multi = tmp_path / "single", tmp_path / "multi"
    train_and_evaluate(config, str(single))
    _run_two_processes(multi, f"--config.data.shard_dir={shard_dir}",
                       config="experiments/bert_pretrain.py:smoke")
    a, b = restored(single), restored(multi)
    assert int(a["step"]) == int(b["step"]) == config.num_train_steps
    compared = 0
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        # A key bias adds the same score to every key of a query, which softmax ignores: its
        # gradient is 0 but for rounding, which differs with the order of the cross-device sum,
        # and Adam scales that noise up to steps of lr.
        if "'W_k']['bias']" not in jax.tree_util.keystr(path):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
            compared += 1
    assert compared > 20


def test_an_empty_shard_directory_is_refused_before_anything_is_written(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is empty: prepare the corpus into it first"):
        train_and_evaluate(_config(empty), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_shards_of_another_tokenizer_are_refused_naming_both(shard_dir, tmp_path):
    workdir = tmp_path / "run"
    train_and_evaluate(_config(shard_dir, num_train_steps=3), str(workdir))
    other = tmp_path / "other"
    config = _config(other, **{"data.train_file": SOURCE})  # its tokenizer: another corpus
    tasks.prepare(config, None, [SOURCE], str(other))
    with pytest.raises(ValueError) as error:
        train_and_evaluate(_config(other), str(workdir))
    assert f"written with a WordPiece tokenizer trained on {SOURCE!r}" in str(error.value)
    assert f"this run tokenizes with the tokenizer.json of {workdir}" in str(error.value)


def test_a_run_resumed_on_shards_prepared_again_is_refused(shard_dir, tmp_path):
    workdir = tmp_path / "run"
    train_and_evaluate(_config(shard_dir, num_train_steps=3), str(workdir))
    again = tmp_path / "again"  # the same text and tokenizer, cut with another seed
    tasks.prepare(_config(again, seed=1), str(workdir), [SOURCE], str(again))
    with pytest.raises(ValueError, match="trained on other rows than the stream holds now"):
        train_and_evaluate(_config(again), str(workdir))


def test_a_corrupt_shard_names_the_file_and_keeps_the_workdir(shard_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in shard_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    workdir = tmp_path / "run"
    train_and_evaluate(_config(broken, num_train_steps=3), str(workdir))
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    shard = broken / "shard-00000.array_record"
    data = bytearray(shard.read_bytes())
    cut = slice(len(data) // 10, 8 * len(data) // 10)  # most rows; the index at the end stays
    data[cut] = bytes(cut.stop - cut.start)
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"corrupt shard {str(shard)!r}"):
        train_and_evaluate(_config(broken), str(workdir))
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert {p: after.get(p) for p in before} == before
    assert json.loads((broken / "manifest.json").read_text())["rows"] > 0


def test_translation_streams_prepared_pairs_and_resumes_exactly(tmp_path):
    import gzip

    from seqjax.data import translation as translation_data
    from seqjax.tasks import translation
    text = gzip.decompress((ROOT / "seqjax/data/fra_eng/fra.txt.gz").read_bytes()).decode()
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("".join(text.splitlines(keepends=True)[:3000]))
    out = tmp_path / "shards"
    config = load_config("translate", "tiny")
    config.data.shard_dir = str(out)
    config.num_train_steps = 6
    tasks.prepare(config, None, [str(pairs)], str(out))
    named = translation.named_tokenizers(config, None, None, str(out))
    expected = translation.train_rows(config, *(tok for tok, _ in named.values()),
                                      translation_data.load_pairs(str(pairs)))
    source = streaming.ShardSource(out)
    got = source.rows(np.arange(len(source)))
    assert set(got) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array)

    once, twice = tmp_path / "once", tmp_path / "twice"
    train_and_evaluate(config, str(once))
    train_and_evaluate(config, str(twice), stop_after=3)
    train_and_evaluate(config, str(twice))
    _same_state(restored(once), restored(twice))
