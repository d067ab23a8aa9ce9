"""Hugging Face BERT checkpoints in and out (`--mode import`, `--mode export --format hf`),
against tests/data/hf_bert: a small BertForPreTraining that `transformers` wrote, with what its
PyTorch model computed for fixed inputs (tests/make_hf_bert_fixture.py, run once; transformers
is not a dependency)."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from seqjax import tasks, transfer
from seqjax.data import pretraining as data_lib
from seqjax.nn.bert import BertPretraining, Pooler
from seqjax.tasks import hf_bert
from seqjax.tasks.bert import make_encoder
from seqjax.train.loop import train_and_evaluate
from seqjax.train.saved_runs import restore_run

from conftest import ROOT, launch, load_config

FIXTURE = ROOT / "tests" / "data" / "hf_bert"
REFERENCE = np.load(FIXTURE / "reference.npz")
# The fixture's model (tests/make_hf_bert_fixture.py's CONFIG) as model config values.
SHAPE = dict(num_layers=2, d_model=32, num_heads=4, ffn_hiddens=48, max_position=40)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hf") / "run"
    report = transfer.import_checkpoint(load_config("bert_pretrain", "smoke"), str(FIXTURE),
                                        str(workdir))
    assert report == dict(arrays=46, fresh=[], vocab_size=309)
    return workdir


def _outputs(workdir):
    """What seqjax's model of an imported run computes for the reference inputs."""
    config, _, params, step = restore_run(str(workdir))
    assert step == 0
    encoder = make_encoder(config, config.data.vocab_size)
    tokens, segments = REFERENCE["input_ids"], REFERENCE["token_type_ids"]
    mask = REFERENCE["attention_mask"].astype(bool)
    p = params["params"]
    hidden = encoder.apply({"params": p["encoder"]}, tokens, segments, mask)
    pooled = Pooler().apply({"params": p["pooler"]}, hidden)
    mlm, nsp = BertPretraining(encoder, nsp=True).apply(params, tokens, segments, mask)
    return dict(last_hidden_state=hidden, pooler_output=pooled, prediction_logits=mlm,
                seq_relationship_logits=nsp)


def test_import_computes_what_transformers_computed(imported):
    config = restore_run(str(imported))[0]
    assert (config.model.norm, config.model.activation, config.model.norm_epsilon) == (
        "post", "gelu_exact", 1e-12)
    valid = REFERENCE["attention_mask"].astype(bool)  # padded positions are not compared
    for name, value in _outputs(imported).items():
        value, want = np.asarray(value), REFERENCE[name]
        if value.ndim == 3:
            value, want = value[valid], want[valid]
        np.testing.assert_allclose(value, want, atol=1e-4, rtol=1e-4, err_msg=name)


def test_tanh_gelu_would_be_wrong(imported):
    """The exact GELU matters at this tolerance: the tanh approximation misses it."""
    config, _, params, _ = restore_run(str(imported))
    config.model.activation = "gelu"
    encoder = make_encoder(config, config.data.vocab_size)
    hidden = encoder.apply({"params": params["params"]["encoder"]}, REFERENCE["input_ids"],
                           REFERENCE["token_type_ids"], REFERENCE["attention_mask"].astype(bool))
    valid = REFERENCE["attention_mask"].astype(bool)
    assert np.abs(np.asarray(hidden)[valid] - REFERENCE["last_hidden_state"][valid]).max() > 1e-4


def test_export_then_import_gives_back_identical_arrays(imported, tmp_path):
    out = tmp_path / "exported"
    transfer.export_checkpoint(str(imported), str(out))
    original = load_file(FIXTURE / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)  # the tied decoder is not written, as HF does
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    assert json.loads((out / "tokenizer_config.json").read_text())["do_lower_case"] is True
    hf, ours = (json.loads((d / "config.json").read_text()) for d in (FIXTURE, out))
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
                "layer_norm_eps", "architectures"):
        assert ours[key] == hf[key], key
    again = tmp_path / "again"
    transfer.import_checkpoint(load_config("bert_pretrain", "smoke"), str(out), str(again))
    jax.tree.map(np.testing.assert_array_equal, restore_run(str(again))[2],
                 restore_run(str(imported))[2])


@pytest.mark.parametrize("files", [("tokenizer.json",), ("vocab.txt", "tokenizer_config.json")])
def test_tokenizer_json_and_vocab_txt_tokenise_as_transformers(files, tmp_path):
    for name in ("config.json", "model.safetensors", *files):
        shutil.copy(FIXTURE / name, tmp_path / name)
    tokenizer = hf_bert.read_tokenizer(str(tmp_path))
    assert data_lib.special_ids(tokenizer) == (0, 5, 6, 7, 8)  # Google's layout, not seqjax's
    sample = "The game's graphics were praised, though the story was called unremarkable."
    arrays = data_lib.classification_arrays(tokenizer, [sample], 64)
    ids = arrays["tokens"][0, :arrays["valid_len"][0]]
    np.testing.assert_array_equal(ids, REFERENCE["sample_ids"])


def test_fine_tuning_an_imported_checkpoint(imported, tmp_path):
    config = load_config("bert_finetune", "smoke,published")
    config.model.update(SHAPE)
    config.unlock()
    config.init_from = str(imported)
    result = train_and_evaluate(config, str(tmp_path / "sst2"))
    assert result["step"] == config.num_train_steps and np.isfinite(result["val_loss"])
    task = tasks.build(config, str(tmp_path / "sst2"))
    assert json.loads(task.files["tokenizer.json"]) == json.loads(
        (imported / "tokenizer.json").read_text())


def _broken_copy(tmp_path, change):
    """The fixture with its arrays changed by `change(arrays)`."""
    from safetensors.numpy import save_file
    source = tmp_path / "broken"
    shutil.copytree(FIXTURE, source)
    arrays = load_file(FIXTURE / "model.safetensors")
    change(arrays)
    save_file(arrays, source / "model.safetensors")
    return source


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update({"bert.encoder.layer.0.attention.self.rotary.weight": np.zeros(3)}),
     "array encoder.layer.0.attention.self.rotary.weight (3,) has no place in seqjax's BERT"),
    (lambda a: a.update({"bert.pooler.dense.weight": np.zeros((32, 31), np.float32)}),
     "array pooler.dense.weight has shape (32, 31), which does not fit seqjax's "
     "pooler/Dense_0/kernel (32, 32)"),
    (lambda a: a.update({"bert.encoder.layer.0.attention.self.key.weight":
                         np.zeros((30, 32), np.float32)}),
     "array encoder.layer.0.attention.self.key.weight has shape (30, 32), which does not split "
     "into num_attention_heads=4 heads"),
    (lambda a: a.pop("bert.encoder.layer.1.output.dense.bias"),
     "the checkpoint lacks the array of seqjax's encoder/blocks_1/ffn/dense2/bias"),
])
def test_a_checkpoint_that_does_not_fit_is_a_clear_error(change, message, tmp_path):
    proc = launch("--config", "experiments/bert_pretrain.py:smoke", "--workdir",
                  str(tmp_path / "run"), "--mode", "import", "--source",
                  str(_broken_copy(tmp_path, change)))
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_export_refuses_what_bert_does_not_compute(tmp_path):
    """A pre-norm run (seqjax's default pretraining) computes something else in BertModel."""
    config = load_config("bert_pretrain", "smoke")
    config.num_train_steps = config.checkpoint_every = 1
    train_and_evaluate(config, str(tmp_path / "run"))
    with pytest.raises(ValueError, match="model.norm='pre'.*post-norm with full attention"):
        transfer.export_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_bert_model_without_heads_imports_with_fresh_heads(tmp_path):
    """A BertModel's checkpoint: no 'bert.' prefix and no MLM or NSP head; the heads start
    fresh, and the encoder and pooler compute what the full checkpoint's do."""
    source = _broken_copy(tmp_path, lambda a: [
        a.update({k.removeprefix("bert."): a.pop(k) for k in list(a) if k.startswith("bert.")}),
        [a.pop(k) for k in list(a) if k.startswith("cls.")]])
    report = transfer.import_checkpoint(load_config("bert_pretrain", "smoke"), str(source),
                                       str(tmp_path / "run"))
    assert report["fresh"] == ["mlm_head", "nsp_head"]
    outputs = _outputs(tmp_path / "run")
    valid = REFERENCE["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(outputs["last_hidden_state"])[valid],
                               REFERENCE["last_hidden_state"][valid], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(outputs["pooler_output"], REFERENCE["pooler_output"], atol=1e-4,
                               rtol=1e-4)
