"""The translation task end to end: a tiny config trains through launch.py, translates from
its checkpoint in a subprocess, reports BLEU and writes attention maps; and bad input."""

import json
import warnings

import jax
import numpy as np
import pytest

from seqjax.data import translation as data_lib
from seqjax.tasks import translation as task_lib
from seqjax.train import saved_runs
from seqjax.train.loop import train_and_evaluate

from conftest import launch, load_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("translate")
    proc = launch("--config", "experiments/translate.py:tiny", "--workdir", str(workdir),
                  timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_tiny_run_reports_bleu_and_writes_attention_maps(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r.get("split") == "val" and "test_bleu_greedy" in r]
    assert len(final) == 1 and final[0]["step"] == 10
    for key in ("bleu", "test_bleu_greedy", "test_bleu_beam2"):
        assert 0 <= final[0][key] <= 100
    assert 0 <= final[0]["test_alignment"] <= 1 and final[0]["test_alignment_links"] > 0
    assert (workdir / "attention_maps.png").stat().st_size > 1000
    rows = (workdir / "test_translations.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "source\treference\tgreedy\tbeam2"
    assert len(rows) == 1 + load_config("translate", "tiny").data.num_test
    for name in task_lib.TOKENIZER_FILES.values():
        assert (workdir / name).exists()


def test_translate_a_sentence_from_the_checkpoint_in_a_subprocess(workdir):
    proc = launch("--config", "experiments/translate.py:tiny", "--workdir", str(workdir),
                  "--mode", "translate", "--text", "I see.", "--beam_size", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = saved_runs.translate(str(workdir), ["I see."], beam_size=2)
    assert proc.stdout.strip().splitlines()[-1] == expected[0]


def test_batched_translation_equals_one_sentence_at_a_time(workdir):
    """30 sentences run as two padded batches of eval_batch_size 24; each row's search does
    not depend on the others."""
    sentences = [p[0] for p in data_lib.load_pairs(max_pairs=400)[::13]][:30]
    batched = saved_runs.translate(str(workdir), sentences, beam_size=2)
    assert len(batched) == 30
    for i in (0, 17, 29):
        assert saved_runs.translate(str(workdir), [sentences[i]], beam_size=2) == [batched[i]]
    for line in batched:
        assert "<eos>" not in line and "<pad>" not in line and "<bos>" not in line


def test_bad_sentences_are_clear_errors(workdir):
    with pytest.raises(ValueError, match="sentence 2 .* is empty"):
        saved_runs.translate(str(workdir), ["I see.", "  "])
    with pytest.raises(ValueError, match="holds no word of the source vocabulary"):
        saved_runs.translate(str(workdir), ["xylophonist quixotically"])


def test_too_long_sentence_is_truncated_with_a_warning(workdir):
    num_steps = load_config("translate", "tiny").data.num_steps
    long = "I see. " * num_steps
    with pytest.warns(UserWarning, match=f"reads at most {num_steps - 1}.*truncated"):
        out = saved_runs.translate(str(workdir), [long])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cut = saved_runs.translate(
            str(workdir), [" ".join(long.replace(".", " .").split()[:num_steps - 1])])
    assert out == cut


def test_checkpoint_of_a_different_vocabulary_is_a_clear_error(workdir, tmp_path):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    name = task_lib.TOKENIZER_FILES["tgt"]
    tokenizer = data_lib.Tokenizer.train(["un deux trois", "quatre cinq"], min_freq=1)
    (other / name).write_text(tokenizer.to_json(), encoding="utf-8")
    with pytest.raises(ValueError, match=r"does not fit this model: parameter .*decoder.*"
                                         r"a different vocabulary"):
        saved_runs.translate(str(other), ["I see."])


@pytest.mark.parametrize("name", task_lib.MODELS)
def test_searcher_against_the_whole_model_on_each_prefix(name):
    """The jitted search (decode cache or recurrent state, padded batches) against the model
    re-run on the whole prefix: greedy picks the argmax at every step, beam 1 is greedy, and
    a beam of 3 never scores below greedy (no length penalty)."""
    config = load_config("translate", f"tiny,model={name}")
    model = task_lib.make_model(config, 13, 11)
    T = config.data.num_steps
    src, src_len = data_lib.build_array([[4, 5, 6], [7], [8, 9, 10, 11, 12]], T)
    params = model.init(jax.random.PRNGKey(0), src, src_len, src)
    searcher = task_lib.Searcher(model, T, batch_size=2)

    def log_probs(row, tokens):  # [T, V] of the model reading <bos> + tokens
        tgt_in = np.asarray([[data_lib.BOS_ID, *tokens[:-1]]], np.int32)
        return jax.nn.log_softmax(model.apply(params, src[row:row + 1], src_len[row:row + 1],
                                              tgt_in)[0], -1)

    def score(row, tokens):
        n = tokens.index(data_lib.EOS_ID) + 1 if data_lib.EOS_ID in tokens else len(tokens)
        lp = log_probs(row, tokens)
        return float(sum(lp[t, tokens[t]] for t in range(n)))

    greedy = searcher(params, src, src_len, beam_size=1, length_penalty=0.0)
    beam = searcher(params, src, src_len, beam_size=3, length_penalty=0.0)
    for row, tokens in enumerate(greedy):
        assert len(tokens) == T
        n = tokens.index(data_lib.EOS_ID) + 1 if data_lib.EOS_ID in tokens else T
        assert tokens[n:] == [data_lib.PAD_ID] * (T - n)
        np.testing.assert_array_equal(np.argmax(log_probs(row, tokens)[:n], -1), tokens[:n])
        assert score(row, beam[row]) >= score(row, tokens) - 1e-5


@pytest.mark.parametrize("arg, override, message", [
    ("tiny", {"data.tokenizer": "chars"}, "config.data.tokenizer='chars'"),
    ("tiny", {"data.num_steps": 1}, "config.data.num_steps=1: must be >= 2"),
    ("tiny", {"decode.length_penalty": -1.0}, "config.decode.length_penalty=-1.0"),
    ("tiny,model=seq2seq_attention", {"model.attention": "local"},
     "config.model.attention='local': the recurrent decoder attends over the whole source"),
    ("tiny", {"data.num_test": 3000}, "too few for num_test=3000"),
])
def test_bad_translate_config_is_a_clear_error(arg, override, message, tmp_path):
    config = load_config("translate", arg)
    config.update_from_flattened_dict(override)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_saved_under_the_old_key_names_evaluates_and_resumes(workdir, tmp_path):
    """model.num_hiddens and model.embed_size are now model.hidden and model.embed_dim, as in
    the char LM: a workdir whose config.json has the old names reads as if it had the new."""
    import shutil
    old = tmp_path / "old"
    shutil.copytree(workdir, old)
    saved = json.loads((old / "config.json").read_text())
    saved["model"]["num_hiddens"] = saved["model"].pop("hidden")
    saved["model"]["embed_size"] = saved["model"].pop("embed_dim")
    (old / "config.json").write_text(json.dumps(saved))
    assert saved_runs.evaluate(None, str(old))["step"] == 10
    config = load_config("translate", "tiny")
    config.num_train_steps = 12
    config.decode.val_sentences = 0
    assert train_and_evaluate(config, str(old))["step"] == 12
    model = json.loads((old / "config.json").read_text())["model"]
    assert "hidden" in model and "num_hiddens" not in model


def test_an_input_file_with_bad_lines_translates_the_others(workdir, tmp_path):
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("I see.\nxylophonist quixotically\nHe is calm.\n", encoding="utf-8")
    proc = launch("--config", "experiments/translate.py:tiny", "--workdir", str(workdir),
                  "--mode", "translate", "--input_file", str(sentences), "--beam_size", "2",
                  timeout=300)
    lines = proc.stdout.split("\n")[:3]
    expected = saved_runs.translate(str(workdir), ["I see.", "He is calm."], beam_size=2)
    assert proc.returncode == 1 and lines == [expected[0], "", expected[1]], proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == ["error: sentence 2 ('xylophonist quixotically') holds no word of the "
                      "source vocabulary"]
