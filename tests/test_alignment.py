"""How well cross-attention aligns (`seqjax.tasks.cross_attention`): the shipped hand-aligned
test pairs, the score against links counted by hand, the batched attention weights of both
translation models, and bad alignment files."""

import jax
import numpy as np
import pytest

from seqjax.data import translation as data_lib
from seqjax.tasks import cross_attention
from seqjax.tasks import translation as task_lib

from conftest import load_config


def test_the_shipped_alignments_are_30_test_pairs_of_the_default_split():
    examples = data_lib.load_alignments()
    assert len(examples) == 30 and len({e[0] for e in examples}) == 30
    assert sum(len(links) for _, _, links in examples) >= 60
    splits = task_lib._splits(load_config("translate"))
    test = {tuple(map(data_lib.preprocess_nmt, p)) for p in splits["test"]}
    assert all((source, target) in test for source, target, _ in examples)
    assert task_lib._aligned_examples(load_config("translate"), splits["train"]) == examples
    # a training source is left out: the score is on held-out sentences only
    assert task_lib._aligned_examples(load_config("translate"), [(examples[3][0], "x")]) == \
        examples[:3] + examples[4:]


def test_alignment_accuracy_counts_the_links_whose_source_word_gets_the_most_weight():
    weights = np.full((2, 4, 5), 0.1)
    weights[0, 0, 2] = weights[0, 1, 0] = weights[1, 2, 1] = 0.9
    weights[1, 0, 4] = 0.9  # beyond sentence 1's valid source (length 3): not its argmax
    links = [[(2, 0), (1, 1)], [(1, 2), (0, 0), (2, 3)]]
    # hits: (2, 0) yes; (1, 1) no (word 0 wins); (1, 2) yes; (0, 0) yes (ties: the first); (2, 3) no
    assert cross_attention.alignment_accuracy(weights, [5, 3], links) == pytest.approx(3 / 5)


@pytest.mark.parametrize("model_name", ["transformer", "seq2seq_attention"])
def test_batched_attention_weights_equal_one_sentence_at_a_time(model_name):
    config = load_config("translate", "tiny")
    config.unlock()
    config.model.name = model_name
    src_tok = data_lib.Tokenizer.train(["a b c d", "e f g"], kind="word", min_freq=1)
    tgt_tok = data_lib.Tokenizer.train(["u v w x", "y z"], kind="word", min_freq=1)
    model = task_lib.make_model(config, len(src_tok), len(tgt_tok))
    T = config.data.num_steps
    src, src_len = data_lib.build_array([src_tok.encode("a b c d"), src_tok.encode("g e")], T)
    tgt, tgt_len = data_lib.build_array([tgt_tok.encode("u v w x"), tgt_tok.encode("y z")], T)
    tgt_in = data_lib.teacher_forcing(dict(src=src, src_len=src_len, tgt=tgt,
                                           tgt_len=tgt_len))["tgt_in"]
    params = model.init(jax.random.PRNGKey(0), src, src_len, tgt_in)
    weights = cross_attention.cross_attention_weights(model, params, src, src_len, tgt_in)
    assert weights.shape == (2, T, T)
    for n in range(2):
        one = cross_attention.cross_attention_weights(model, params, src[n:n + 1],
                                                      src_len[n:n + 1], tgt_in[n:n + 1])
        np.testing.assert_allclose(weights[n], one[0], atol=1e-6)
        np.testing.assert_allclose(weights[n].sum(-1), 1.0, atol=1e-5)
        assert np.all(weights[n][:, src_len[n]:] < 1e-6)  # padding gets no weight
    examples = [("a b c d", "u v w x", [(0, 0), (3, 3)]), ("g e", "y z", [(1, 1)])]
    scored = cross_attention.alignment(model, params, src_tok, tgt_tok, examples, T)
    expected = cross_attention.alignment_accuracy(weights, src_len,
                                                  [links for _, _, links in examples])
    assert scored == dict(alignment=expected, alignment_links=3)


@pytest.mark.parametrize("line, problem", [
    ("he is calm .\til est calme .", "not 'source<TAB>target<TAB>links'"),
    ("he is calm .\til est calme .\t0-0 5-1", "link 5-1 is outside the 4 source and 4 target"),
    ("he is calm .\til est calme .\t0:0", "not 'source<TAB>target<TAB>links'"),
])
def test_a_bad_alignment_file_is_an_error_naming_the_line(tmp_path, line, problem):
    path = tmp_path / "alignments.tsv"
    path.write_text("# a comment\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"line 2 of .*{problem}"):
        data_lib.load_alignments(str(path))
    empty = tmp_path / "empty.tsv"
    empty.write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no aligned pair"):
        data_lib.load_alignments(str(empty))


def test_which_alignments_a_run_scores(tmp_path):
    """The shipped ones go with the shipped pairs and word tokens only; a file of one's own
    needs word tokens (a config error otherwise); '' scores none."""
    config = load_config("translate", "tiny")
    config.unlock()
    train = [("he is calm .", "il est calme .")]
    assert len(task_lib._aligned_examples(config, train)) == 30
    config.data.path = str(tmp_path / "pairs.tsv")
    assert task_lib._aligned_examples(config, train) == []
    own = tmp_path / "alignments.tsv"
    own.write_text("he is calm .\til est calme .\t0-0 2-2\n", encoding="utf-8")
    config.decode.alignment_file = str(own)
    assert task_lib._aligned_examples(config, []) == [
        ("he is calm .", "il est calme .", [(0, 0), (2, 2)])]
    assert task_lib._aligned_examples(config, train) == []  # its source is a training one
    config.data.tokenizer = "bpe"
    with pytest.raises(ValueError, match="data.tokenizer.*alignment_file links words"):
        task_lib.check_config(config)
    config.decode.alignment_file = ""
    task_lib.check_config(config)
    assert task_lib._aligned_examples(config, train) == []


def test_alignment_needs_word_tokens():
    tok = data_lib.Tokenizer.train(["a b c"] * 20, kind="bpe", vocab_size=40)
    with pytest.raises(ValueError, match="data.tokenizer='word'"):
        cross_attention.alignment(None, None, tok, tok, [], 8)
