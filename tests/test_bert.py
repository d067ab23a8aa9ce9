"""BERT: the model against a NumPy reference, the tied MLM projection, the loss on chosen
positions only, pretraining sequences, a tiny pretrain and fine-tune through launch.py, exact
loading of the pretrained encoder, and bad input."""


import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import config as config_lib
from seqjax.data import pretraining as data_lib
from seqjax.nn.bert import BertEncoder, BertPretraining
from seqjax.tasks import bert as task_lib
from seqjax.tasks import bert_finetune
from seqjax.train import checkpoint, saved_runs

import reference
from conftest import launch, load_config, logged

# ----------------------------------------------------------------------------- the model


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def _reference(params, tokens, segments, mask, positions):
    """BERT's forward pass (post-norm blocks, GELU FFN, tied MLM head, pooler, NSP head) in
    NumPy float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    enc = p["encoder"]
    E = enc["token_embed"]["embedding"]
    L = tokens.shape[1]
    x = E[tokens] + enc["segment_embed"]["embedding"][segments] + enc["position"]["P"][:L]
    x = reference.layer_norm(x, enc["embed_ln"])
    for i in range(sum(name.startswith("blocks_") for name in enc)):
        blk = enc[f"blocks_{i}"]
        allowed_BxLxL = np.repeat(mask[:, None, :], L, 1)
        out = np.stack([reference.attention(blk["attention"], x[b], x[b], allowed_BxLxL[b])
                        for b in range(len(x))])
        x = reference.layer_norm(x + out, blk["addnorm1"]["ln"])
        ffn = _dense(_gelu(_dense(x, blk["ffn"]["dense1"])), blk["ffn"]["dense2"])
        x = reference.layer_norm(x + ffn, blk["addnorm2"]["ln"])
    h = np.take_along_axis(x, positions[..., None], 1)
    head = p["mlm_head"]
    h = reference.layer_norm(_gelu(_dense(h, head["transform"])), head["ln"])
    mlm = h @ E.T + head["bias"]
    pooled = np.tanh(_dense(x[:, 0], p["pooler"]["Dense_0"]))
    return mlm, _dense(pooled, p["nsp_head"])


@pytest.fixture(scope="module")
def model_and_params():
    encoder = BertEncoder(50, num_layers=2, d_model=16, num_heads=2, ffn_hiddens=24,
                          max_length=12, dropout_rate=0.0, attention_dropout_rate=0.0)
    model = BertPretraining(encoder)
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 50, (3, 10)).astype(np.int32)
    segments = (np.arange(10)[None] >= np.array([[4], [6], [2]])).astype(np.int32)
    mask = np.arange(10)[None] < np.array([[10], [7], [5]])
    positions = np.array([[1, 3, 8], [2, 5, 6], [1, 2, 4]], np.int32)
    params = model.init(jax.random.PRNGKey(0), tokens, segments, mask, positions)
    # Non-trivial LayerNorm and bias values, different for every array, so the reference
    # checks them too and would notice two of them swapped.
    params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(a.dtype), params)
    return model, params, (tokens, segments, mask, positions)


def test_bert_matches_a_numpy_reference(model_and_params):
    model, params, inputs = model_and_params
    mlm, nsp = model.apply(params, *map(jnp.asarray, inputs))
    ref_mlm, ref_nsp = _reference(params, *inputs)
    np.testing.assert_allclose(mlm, ref_mlm, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(nsp, ref_nsp, atol=2e-4, rtol=2e-4)


def test_mlm_output_projection_is_the_token_embedding(model_and_params):
    model, params, inputs = model_and_params
    V, E = params["params"]["encoder"]["token_embed"]["embedding"].shape
    shapes = [x.shape for x in jax.tree.leaves(params)]
    assert shapes.count((V, E)) == 1 and (E, V) not in shapes  # no separate output matrix

    def logits_of(embedding):
        p = jax.tree.map(lambda x: x, params)
        p["params"]["encoder"]["token_embed"]["embedding"] = embedding
        return model.apply(p, *map(jnp.asarray, inputs))[0]

    # The gradient of the logits through the output projection alone (embedding frozen at the
    # input) is the MLM head's features: the same array serves both ends.
    emb = params["params"]["encoder"]["token_embed"]["embedding"]
    grad = jax.grad(lambda e: logits_of(e)[0, 0, 7])(emb)
    assert np.abs(np.asarray(grad[7])).sum() > 0
    changed = emb.at[7].add(1.0)
    tokens = inputs[0]
    assert 7 not in tokens  # row 7 reaches the logits only through the output projection
    diff = np.asarray(logits_of(changed) - logits_of(emb))
    assert np.abs(diff[..., 7]).min() > 0 and np.abs(np.delete(diff, 7, -1)).max() < 1e-5


def test_local_attention_encoder_equals_full_when_one_block_covers_the_sequence():
    kw = dict(vocab_size=30, num_layers=1, d_model=8, num_heads=2, ffn_hiddens=16, max_length=8,
              dropout_rate=0.0, attention_dropout_rate=0.0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(5, 30, (2, 8)), jnp.int32)
    mask = jnp.arange(8)[None] < jnp.array([[8], [5]])
    full = BertEncoder(**kw)
    params = full.init(jax.random.PRNGKey(0), tokens, None, mask)
    local = BertEncoder(**kw, attention="local", block_size=4, look_back=1)
    out_full = full.apply(params, tokens, None, mask)
    out_local = local.apply(params, tokens, None, mask)
    np.testing.assert_allclose(out_local[:, 4:], out_full[:, 4:], atol=1e-5)  # sees both blocks
    assert np.abs(np.asarray(out_local[0, :4] - out_full[0, :4])).max() > 1e-4  # sees one
    # Looking one block ahead as well, the first block sees the second: full attention again.
    both_ways = BertEncoder(**kw, attention="local", block_size=4, look_back=1, look_ahead=1)
    np.testing.assert_allclose(both_ways.apply(params, tokens, None, mask), out_full, atol=1e-5)


def test_a_local_run_saved_before_look_ahead_reads_as_the_0_it_computed(tmp_path):
    """A key a saved config lacks reads as the experiment's default, except look_ahead of a
    block-local model, whose runs before the key looked back only."""
    for attention, expected in (("local", 0), ("full", None)):
        (tmp_path / "config.json").write_text(json.dumps(
            {"task": "bert_pretrain", "model": {"attention": attention, "look_back": 1}}))
        assert config_lib.load(str(tmp_path)).model.get("look_ahead") == expected


def test_sequence_longer_than_the_position_table_is_a_clear_error():
    encoder = BertEncoder(30, num_layers=1, d_model=8, num_heads=2, ffn_hiddens=16, max_length=8)
    with pytest.raises(ValueError, match="longer than the model's max_length 8"):
        encoder.init(jax.random.PRNGKey(0), jnp.ones((1, 9), jnp.int32))
    config = load_config("bert_pretrain", "smoke")
    config.unlock()
    config.data.max_seq_len = 64
    with pytest.raises(ValueError, match="longer than the position table"):
        task_lib.build_pretrain(config)


# ----------------------------------------------------------------------------- data


def test_pretraining_sequences_and_next_sentence_labels():
    """Sentences are numbered 1000 * document + index, so a pair's B really follows A exactly
    when its first token is A's last plus one, in the same document."""
    documents = [[[1000 * d + i] * 3 for i in range(20)] for d in range(1, 30)]
    arrays = data_lib.pretraining_arrays(documents, 16, nsp=True, seed=0)
    labels = []
    for tokens, segments, n, label in zip(arrays["tokens"], arrays["segments"],
                                          arrays["valid_len"], arrays["nsp_label"]):
        tokens, segments = tokens[:n], segments[:n]
        seps = np.flatnonzero(tokens == data_lib.SEP_ID)
        assert tokens[0] == data_lib.CLS_ID and len(seps) == 2 and seps[1] == n - 1
        assert (segments[:seps[0] + 1] == 0).all() and (segments[seps[0] + 1:] == 1).all()
        assert (arrays["tokens"][len(labels), n:] == data_lib.PAD_ID).all() and n <= 16
        a, b = tokens[1:seps[0]], tokens[seps[0] + 1:-1]
        follows = b[0] // 1000 == a[-1] // 1000 and b[0] == a[-1] + 1
        same_document = b[0] // 1000 == a[-1] // 1000
        assert follows if label else not same_document
        labels.append(label)
    assert 0.35 < np.mean(labels) < 0.65 and len(labels) > 100
    single = data_lib.pretraining_arrays(documents, 16, nsp=False, seed=0)
    assert (single["segments"] == 0).all() and (single["nsp_label"] == 0).all()


def test_bad_corpora_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.tokens"
    empty.write_text(" \n = = Heading = = \n \n")
    with pytest.raises(ValueError, match="holds no text"):
        data_lib.load_wikitext(path=empty)
    with pytest.raises(FileNotFoundError, match="not found"):
        data_lib.load_wikitext(path=tmp_path / "missing.tokens")
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood film\tpositive\n")
    with pytest.raises(ValueError, match="line 2 .* not 'sentence<TAB>label'"):
        data_lib.load_sst2(path=bad)
    header_only = tmp_path / "header.tsv"
    header_only.write_text("sentence\tlabel\n")
    with pytest.raises(ValueError, match="holds no labelled sentence"):
        data_lib.load_sst2(path=header_only)


# ----------------------------------------------------------------------------- the task


@pytest.fixture(scope="module")
def pretrain_task():
    config = load_config("bert_pretrain", "smoke")
    task = task_lib.build_pretrain(config)
    return task, task.init_params(jax.random.PRNGKey(0))


def test_mlm_loss_ignores_unchosen_positions(pretrain_task):
    task, params = pretrain_task
    batch = jax.tree.map(jnp.asarray, task.eval_batches[0])
    sums, _ = task.loss(params, batch, (), rng=None, train=False)
    unchosen = batch["weights"] == 0
    assert unchosen.any() and (~unchosen).any()
    scrambled = dict(batch, targets=jnp.where(unchosen, (batch["targets"] + 17) % 200,
                                              batch["targets"]))
    same, _ = task.loss(params, scrambled, (), rng=None, train=False)
    for k in ("mlm_loss", "mlm_accuracy", "weight"):
        assert float(same[k]) == float(sums[k])
    chosen = jnp.argmax(batch["weights"][0])
    moved = dict(batch, targets=batch["targets"].at[0, chosen].add(1))
    moved_loss = task.loss(params, moved, (), rng=None, train=False)[0]["mlm_loss"]
    assert float(moved_loss) != float(sums["mlm_loss"])


def test_training_draws_a_fresh_mask_from_the_steps_key(pretrain_task):
    task, params = pretrain_task
    batch = jax.tree.map(jnp.asarray, task.train_batch(0))
    loss = jax.jit(lambda rng: task.loss(params, batch, (), rng=rng, train=True)[0]["mlm_loss"])
    a, b = (float(loss(jax.random.PRNGKey(i))) for i in (0, 1))
    assert a == float(loss(jax.random.PRNGKey(0))) and a != b


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bert_pretrain")
    proc = launch("--config", "experiments/bert_pretrain.py:smoke", "--workdir", str(workdir),
                  timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_tiny_pretrain_reports_mlm_and_nsp_metrics(pretrained):
    val = logged(pretrained, "val")[-1]
    for key in ("mlm_accuracy", "nsp_accuracy"):
        assert 0 <= val[key] <= 1
    assert val["mlm_perplexity"] > 1 and (pretrained / task_lib.TOKENIZER_FILE).exists()


def test_finetune_from_the_pretraining_checkpoint_in_a_subprocess(pretrained, tmp_path):
    workdir = tmp_path / "sst2"
    proc = launch("--config", "experiments/bert_finetune.py:smoke", "--workdir", str(workdir),
                  f"--config.init_from={pretrained}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialised encoder, pooler from {pretrained}" in proc.stderr + proc.stdout
    assert "val_accuracy" in proc.stdout
    assert ((workdir / task_lib.TOKENIZER_FILE).read_text()
            == (pretrained / task_lib.TOKENIZER_FILE).read_text())


def test_init_from_loads_exactly_the_pretrained_encoder(pretrained):
    config = load_config("bert_finetune", "smoke")
    config.unlock()
    config.init_from = str(pretrained)
    task = bert_finetune.build_finetune(config)
    fresh = task.init_params(jax.random.PRNGKey(1))
    loaded, names = checkpoint.load_init_from(fresh, str(pretrained))
    assert names == ["encoder", "pooler"]
    saved = saved_runs.restore_run(str(pretrained))[2]
    for name in names:
        jax.tree.map(np.testing.assert_array_equal, loaded["params"][name], saved["params"][name])
    jax.tree.map(np.testing.assert_array_equal, loaded["params"]["classifier"],
                 fresh["params"]["classifier"])
    assert "mlm_head" not in loaded["params"]


def test_bad_init_from_is_a_clear_error_and_writes_nothing(pretrained, tmp_path):
    workdir = tmp_path / "sst2"
    proc = launch("--config", "experiments/bert_finetune.py:smoke", "--workdir", str(workdir),
                  f"--config.init_from={tmp_path / 'missing'}")
    assert proc.returncode == 1 and "missing': no such directory" in proc.stderr
    proc = launch("--config", "experiments/bert_finetune.py:smoke", "--workdir", str(workdir),
                  f"--config.init_from={tmp_path}")
    assert proc.returncode == 1 and "holds no tokenizer.json" in proc.stderr
    proc = launch("--config", "experiments/bert_finetune.py:smoke", "--workdir", str(workdir),
                  f"--config.init_from={pretrained}", "--config.model.ffn_hiddens=48")
    assert proc.returncode == 1
    assert "model.ffn_hiddens=32 there, 48 here" in proc.stderr
    # Same shapes, other arithmetic: the activation and LayerNorm's epsilon are checked too.
    proc = launch("--config", "experiments/bert_finetune.py:smoke", "--workdir", str(workdir),
                  f"--config.init_from={pretrained}", "--config.model.norm_epsilon=1e-12",
                  "--config.model.activation=gelu_exact")
    assert proc.returncode == 1
    assert ("model.activation='gelu' there, 'gelu_exact' here; model.norm_epsilon=1e-06 there, "
            "1e-12 here. Set --config.model.activation=gelu --config.model.norm_epsilon=1e-06"
            in proc.stderr), proc.stderr[-2000:]
    assert not workdir.exists()
