"""seqjax.nn.transformer against NumPy (Add&Norm, the position-wise FFN), and properties of the
decoder-only LM: causality, cached decoding equals the full call, a clear error past
max_length; and the char-LM Transformer task end to end on four devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.analysis import attention_maps
from seqjax.nn.transformer import AddNorm, PositionwiseFFN, TransformerLM
from seqjax.tasks import charlm, charlm_transformer
from seqjax.train.checkpoint import Checkpoints
from seqjax.train.loop import train_and_evaluate

from conftest import load_config


def _layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_add_norm_and_ffn_match_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 5, 8))
    add_norm = AddNorm()
    p = add_norm.init(jax.random.key(0), x, y)
    p = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), p)
    ln = p["params"]["ln"]
    np.testing.assert_allclose(add_norm.apply(p, x, y),
                               _layer_norm(x + y, ln["scale"], ln["bias"]), atol=1e-5)

    ffn = PositionwiseFFN(16, out_features=3)
    p = ffn.init(jax.random.key(0), x)["params"]
    d1, d2 = p["dense1"], p["dense2"]
    want = np.maximum(x @ d1["kernel"] + d1["bias"], 0) @ d2["kernel"] + d2["bias"]
    np.testing.assert_allclose(ffn.apply({"params": p}, x), want, atol=1e-5)


def _lm(**kwargs):
    defaults = dict(vocab_size=11, num_layers=2, d_model=16, num_heads=2, ffn_hiddens=32,
                    max_length=12, block_size=4, look_back=1)
    return TransformerLM(**{**defaults, **kwargs})


CASES = [dict(position=p, attention=a, norm=n) for p, a, n in (
    ("sinusoidal", "full", "post"), ("learned", "local", "pre"), ("rotary", "local", "pre"),
    ("rotary", "full", "post"))]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: "-".join(k.values()))
def test_lm_is_causal_and_cached_decoding_equals_the_full_call(kwargs):
    model = _lm(**kwargs)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 11)
    params = model.init(jax.random.key(1), tokens)
    full = jax.jit(model.apply)(params, tokens)

    # causality: changing tokens after t changes no logit at or before t
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % 11)
    np.testing.assert_allclose(jax.jit(model.apply)(params, changed)[:, :7], full[:, :7],
                               atol=1e-6)
    assert np.abs(jax.jit(model.apply)(params, changed)[:, 7:] - full[:, 7:]).max() > 1e-3

    # a prefill of 3 tokens, then one token at a time
    decoder = model.clone(decode=True)
    cache = decoder.init(jax.random.key(1), tokens)["cache"]
    step = jax.jit(lambda cache, t: decoder.apply({**params, "cache": cache}, t,
                                                  mutable=["cache"]))
    outs = []
    for chunk in [tokens[:, :3]] + [tokens[:, t:t + 1] for t in range(3, 12)]:
        logits, variables = step(cache, chunk)
        outs.append(logits)
        cache = variables["cache"]
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_lm_rejects_a_sequence_longer_than_max_length():
    model = _lm()
    with pytest.raises(ValueError, match="longer than the model's max_length 12"):
        model.init(jax.random.key(0), jnp.zeros((1, 13), jnp.int32))
    with pytest.raises(ValueError, match="position='bogus'"):
        _lm(position="bogus").init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_transformer_task_trains_resumes_and_samples(tmp_path):
    config = load_config("charlm_transformer", "tiny,attention=local")
    config.num_train_steps = 8
    config.checkpoint_every = 4
    config.log_every = 1
    results = train_and_evaluate(config, str(tmp_path / "run"))  # 4 devices, 2 rows each
    assert results["step"] == 8 and np.isfinite(results["val_perplexity"])
    assert results["sample"].startswith("time traveller") and len(results["sample"]) == 14 + 16

    first = train_and_evaluate(config, str(tmp_path / "twice"), stop_after=4)
    assert first["stopped"]
    train_and_evaluate(config, str(tmp_path / "twice"))
    states = []
    for name in ("run", "twice"):
        ckpts = Checkpoints(str(tmp_path / name))
        states.append(ckpts.restore(which="latest")[0]["params"])
        ckpts.close()
    for a, b in zip(*map(jax.tree.leaves, states)):
        np.testing.assert_array_equal(a, b)

    maps = load_config("attention_maps")
    maps.from_workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="with model.attention='full', found task "
                                         "'charlm_transformer' with attention 'local'"):
        attention_maps.run(maps, str(tmp_path / "maps"))
    assert (tmp_path / "maps" / "positional_encoding.png").stat().st_size > 0


def test_attention_maps_are_causal_distributions():
    config = load_config("charlm_transformer", "tiny")
    vocab, _, valid_ids = charlm.load_corpus(config)
    model = charlm_transformer.make_model(config, len(vocab))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    text = "".join(vocab.to_tokens(valid_ids[:20].tolist()))
    weights = attention_maps.attention_weights(config, params, vocab, text)
    assert weights.shape == (1, 2, 20, 20)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(weights, k=1) == 0)


@pytest.mark.parametrize("override, message", [
    ({"model.block_size": 0}, "config.model.block_size=0: must be a positive integer"),
    ({"model.num_heads": 3}, "config.model.d_model=16: must be divisible by model.num_heads=3"),
    ({"model.attention": "sparse"}, "config.model.attention='sparse'"),
    ({"sample.length": 40}, "config.sample.length=40: the prefix"),
    ({"model.look_ahead": 1}, "config.model.look_ahead=1: a causal language model sees no later"),
    ({"model.look_back": -1}, "config.model.look_back=-1: must be >= 0"),
])
def test_bad_transformer_config_is_a_clear_error(override, message, tmp_path):
    config = load_config("charlm_transformer", "tiny")
    config.update_from_flattened_dict(override)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
