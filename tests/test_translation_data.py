"""Translation data: preprocessing against d2l's code, vocabularies, the split, and batches."""

import gzip

import numpy as np
import pytest

from seqjax.data import translation as T

PAIRS = [("Go.", "Va !"), ("Hi.", "Salut !"), ("Run!", "Cours\u202f!"), ("Run!", "Courez\u202f!"),
         ("Who?", "Qui ?"), ("Wow!", "Ça alors\u202f!"), ("I see.", "Je vois."),
         ("I try.", "J'essaye."), ("I won!", "J'ai gagné !"), ("Go.", "Bouge !")]


def d2l_preprocess_nmt(text):
    """d2l's `preprocess_nmt`, verbatim."""
    def no_space(char, prev_char):
        return char in set(',.!?') and prev_char != ' '
    text = text.replace('\u202f', ' ').replace('\xa0', ' ').lower()
    out = [' ' + char if i > 0 and no_space(char, text[i - 1]) else char
           for i, char in enumerate(text)]
    return ''.join(out)


def test_preprocessing_matches_d2l_on_the_shipped_pairs():
    pairs = T.load_pairs(max_pairs=3000)
    assert pairs[:3] == [("Go.", "Va !"), ("Hi.", "Salut !"), ("Run!", "Cours\u202f!")]
    for source, target in pairs[::7]:
        assert T.preprocess_nmt(source) == d2l_preprocess_nmt(source)
        assert T.preprocess_nmt(target) == d2l_preprocess_nmt(target)


def test_word_vocabulary_min_freq_reserved_ids_and_round_trip():
    texts = ["the cat sat .", "the dog sat .", "a bird !"]
    tok = T.Tokenizer.train(texts, kind="word", min_freq=2)
    assert tok.tokens(range(4)) == ["<unk>", "<pad>", "<bos>", "<eos>"]
    assert (T.UNK_ID, T.PAD_ID, T.BOS_ID, T.EOS_ID) == (0, 1, 2, 3)
    assert set(tok.tokens(range(4, len(tok)))) == {"the", "sat", "."}  # seen at least twice
    assert tok.encode("The cat sat.") == [tok.encode("the")[0], T.UNK_ID, *tok.encode("sat .")]
    ids = tok.encode("the sat .")
    assert tok.decode(ids + [T.EOS_ID, T.PAD_ID, 5]) == "the sat ."
    capped = T.Tokenizer.train(texts, kind="word", min_freq=1, vocab_size=6)
    assert len(capped) == 6 and capped.tokens([4, 5]) == [".", "sat"]  # by frequency, then token


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_subword_tokenizers_keep_the_reserved_ids_and_round_trip(kind):
    texts = [t for _, t in T.load_pairs(max_pairs=2000)]
    tok = T.Tokenizer.train(texts, kind=kind, min_freq=2, vocab_size=600)
    assert tok.tokens(range(4)) == ["<unk>", "<pad>", "<bos>", "<eos>"]
    assert len(tok) <= 600
    for text in texts[::97]:
        words = " ".join(T.tokenize_words(T.preprocess_nmt(text)))
        assert tok.decode(tok.encode(text)) == words
    again = T.Tokenizer.from_json(tok.to_json())
    assert again == tok and again.encode(texts[5]) == tok.encode(texts[5])


def test_tokenizer_json_round_trip_and_errors():
    tok = T.Tokenizer.train(["a b c", "a b"], kind="word", min_freq=1)
    assert T.Tokenizer.from_json(tok.to_json()) == tok
    with pytest.raises(ValueError, match="malformed tokenizer JSON"):
        T.Tokenizer.from_json("{not json")
    with pytest.raises(ValueError, match="not a version-1 seqjax.Tokenizer"):
        T.Tokenizer.from_json('{"format": "other", "kind": "word", "model": ""}')
    with pytest.raises(ValueError, match="tokenizer kind"):
        T.Tokenizer.train(["a"], kind="chars")


def test_load_pairs_from_a_user_file(tmp_path):
    lines = "Hello.\tBonjour.\tCC-BY 2.0 (France) attribution\n\nBye.\tSalut.\n"
    plain = tmp_path / "pairs.tsv"
    plain.write_text(lines, encoding="utf-8")
    packed = tmp_path / "pairs.tsv.gz"
    packed.write_bytes(gzip.compress(lines.encode()))
    for path in (plain, packed):
        assert T.load_pairs(path) == [("Hello.", "Bonjour."), ("Bye.", "Salut.")]
    assert T.load_pairs(plain, max_pairs=1) == [("Hello.", "Bonjour.")]


def test_load_pairs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        T.load_pairs(tmp_path / "missing.tsv")
    empty = tmp_path / "empty.tsv"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no sentence pair"):
        T.load_pairs(empty)
    bad = tmp_path / "bad.tsv"
    bad.write_text("Hello.\tBonjour.\nno tab here\n")
    with pytest.raises(ValueError, match="line 2 .* is not 'source<TAB>target'"):
        T.load_pairs(bad)
    with pytest.raises(ValueError, match="is a directory"):
        T.load_pairs(tmp_path)


def test_split_is_seeded_exact_and_disjoint_by_source():
    pairs = T.load_pairs(max_pairs=5000)
    split = T.split_pairs(pairs, num_valid=300, num_test=400, seed=0)
    assert (len(split["test"]), len(split["valid"])) == (400, 300)
    sources = {name: {T.preprocess_nmt(pairs[i][0]).strip() for i in idx}
               for name, idx in split.items()}
    assert not sources["test"] & sources["train"] and not sources["valid"] & sources["train"]
    assert not sources["test"] & sources["valid"]
    used = np.concatenate(list(split.values()))
    assert len(np.unique(used)) == len(used)
    again = T.split_pairs(pairs, num_valid=300, num_test=400, seed=0)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    other = T.split_pairs(pairs, num_valid=300, num_test=400, seed=1)
    assert not np.array_equal(split["test"], other["test"])
    with pytest.raises(ValueError, match="too few"):
        T.split_pairs(PAIRS, num_valid=5, num_test=5)


def test_build_array_truncates_keeps_eos_and_pads():
    ids, valid = T.build_array([[5, 6, 7, 8, 9], [5], []], num_steps=4)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 3], [5, 3, 1, 1], [3, 1, 1, 1]])
    np.testing.assert_array_equal(valid, [4, 2, 1])
    with pytest.raises(ValueError, match="num_steps"):
        T.build_array([[5]], num_steps=1)


def _arrays(n=10, steps=5):
    rng = np.random.default_rng(0)
    lists = [rng.integers(4, 20, rng.integers(1, 7)).tolist() for _ in range(n)]
    return (*T.build_array(lists, steps), *T.build_array(lists[::-1], steps))


def test_training_batches_are_a_pure_function_of_the_step_and_shard():
    arrays = _arrays()
    batches = T.TranslationBatches(*arrays, batch_size=4, seed=3)
    assert batches.steps_per_epoch == 2
    first = batches(5)
    fresh = T.TranslationBatches(*arrays, batch_size=4, seed=3)
    fresh(0)
    for key, value in fresh(5).items():
        np.testing.assert_array_equal(value, first[key])
    shards = [T.TranslationBatches(*arrays, batch_size=4, seed=3, shard_index=i, num_shards=2)(5)
              for i in range(2)]
    for key in first:
        np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), first[key])
    np.testing.assert_array_equal(first["tgt_in"][:, 0], T.BOS_ID)
    np.testing.assert_array_equal(first["tgt_in"][:, 1:], first["tgt_out"][:, :-1])
    np.testing.assert_array_equal(first["weights"].sum(1), first["tgt_out"].__ne__(T.PAD_ID).sum(1))
    with pytest.raises(ValueError, match="too few"):
        T.TranslationBatches(*arrays, batch_size=11)


def test_eval_batches_cover_every_pair_once():
    arrays = _arrays(n=7)
    batches = T.eval_batches(*arrays, batch_size=3)
    assert len(batches) == 3
    weights = np.concatenate([b["weights"] for b in batches])
    assert weights.sum() == arrays[3].sum() and weights[7:].sum() == 0
    np.testing.assert_array_equal(np.concatenate([b["src"] for b in batches])[:7], arrays[0])
