"""Hugging Face BERT checkpoints in and out: the directory `transformers` writes and reads
(`config.json`, `model.safetensors`, and `tokenizer.json` or `vocab.txt`), read and written with
the `safetensors` library's NumPy API, so that no PyTorch is needed.

`read_checkpoint(source)` gives the config values of the model it holds (post-norm, the exact
GELU of `hidden_act='gelu'`, its LayerNorm epsilon, vocabulary, position table and token
types), its parameters as seqjax's `BertPretraining` tree, and its WordPiece tokenizer.
`write_checkpoint(config, params, tokenizer, out)` writes a seqjax BERT (pretraining or
fine-tuned) in the layout of `BertForPreTraining` / `BertForMaskedLM` /
`BertForSequenceClassification`, which `transformers.BertModel.from_pretrained` loads.

One table (`_table`) maps each Hugging Face array to its seqjax parameter, with how its axes
differ: PyTorch's Linear holds [out, in] where Flax's Dense holds [in, out], and seqjax's
attention projections hold their heads on an axis of their own ([E, H, D] and [H, D, E]).
An array the model has no place for, or a shape that does not fit, is an error naming it.
"""

import json
import os

import flax
import jax
import numpy as np

from seqjax import files
from seqjax.data import pretraining as data_lib

CONFIG, WEIGHTS, VOCAB = "config.json", "model.safetensors", "vocab.txt"
TOKENIZER = "tokenizer.json"
# hidden_act -> seqjax's activation: 'gelu' is the exact (erf) GELU in transformers
_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                "relu": "relu"}
_IGNORED = ("embeddings.position_ids",)  # a buffer older checkpoints saved, not a parameter


def _same(x, _):
    return x


def _linear(x, _):  # [out, in] <-> [in, out]
    return x.T


def _heads_in(x, H):  # [H*D, E] -> [E, H, D]
    return x.T.reshape(x.shape[1], H, -1)


def _heads_in_back(x, _):
    return x.reshape(x.shape[0], -1).T


def _heads_out(x, H):  # [E, H*D] -> [H, D, E]
    return x.T.reshape(H, -1, x.shape[0])


def _heads_out_back(x, _):
    return x.reshape(-1, x.shape[-1]).T


def _heads_bias(x, H):  # [H*D] -> [H, D]
    return x.reshape(H, -1)


def _flat(x, _):
    return x.reshape(-1)


SAME, LINEAR = (_same, _same), (_linear, _linear)
HEADS_IN, HEADS_OUT, HEADS_BIAS = (_heads_in, _heads_in_back), (_heads_out, _heads_out_back), \
    (_heads_bias, _flat)


def _dense(hf: str, ours: str) -> list:
    return [(f"{hf}.weight", f"{ours}/kernel", LINEAR), (f"{hf}.bias", f"{ours}/bias", SAME)]


def _norm(hf: str, ours: str) -> list:
    return [(f"{hf}.weight", f"{ours}/scale", SAME), (f"{hf}.bias", f"{ours}/bias", SAME)]


def _table(num_layers: int) -> list:
    """(Hugging Face name without 'bert.', seqjax path under 'params', (to seqjax, back))."""
    rows = [("embeddings.word_embeddings.weight", "encoder/token_embed/embedding", SAME),
            ("embeddings.position_embeddings.weight", "encoder/position/P", SAME),
            ("embeddings.token_type_embeddings.weight", "encoder/segment_embed/embedding", SAME),
            *_norm("embeddings.LayerNorm", "encoder/embed_ln")]
    for i in range(num_layers):
        hf, ours = f"encoder.layer.{i}", f"encoder/blocks_{i}"
        for name in ("query", "key", "value"):
            w = f"{ours}/attention/W_{name[0]}"
            rows += [(f"{hf}.attention.self.{name}.weight", f"{w}/kernel", HEADS_IN),
                     (f"{hf}.attention.self.{name}.bias", f"{w}/bias", HEADS_BIAS)]
        rows += [(f"{hf}.attention.output.dense.weight", f"{ours}/attention/W_o/kernel",
                  HEADS_OUT),
                 (f"{hf}.attention.output.dense.bias", f"{ours}/attention/W_o/bias", SAME),
                 *_norm(f"{hf}.attention.output.LayerNorm", f"{ours}/addnorm1/ln"),
                 *_dense(f"{hf}.intermediate.dense", f"{ours}/ffn/dense1"),
                 *_dense(f"{hf}.output.dense", f"{ours}/ffn/dense2"),
                 *_norm(f"{hf}.output.LayerNorm", f"{ours}/addnorm2/ln")]
    return rows + [*_dense("pooler.dense", "pooler/Dense_0"),
                   *_dense("cls.predictions.transform.dense", "mlm_head/transform"),
                   *_norm("cls.predictions.transform.LayerNorm", "mlm_head/ln"),
                   ("cls.predictions.bias", "mlm_head/bias", SAME),
                   *_dense("cls.seq_relationship", "nsp_head"),
                   *_dense("classifier", "classifier")]


def _base_name(name: str) -> str:
    """A checkpoint's array name as `_table` spells it: without the base model's 'bert.'
    prefix (models with heads save it), LayerNorm's old 'gamma'/'beta' as 'weight'/'bias'."""
    name = name.removeprefix("bert.")
    if ".LayerNorm." in name:
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name


# ------------------------------------------------------------------------------------ reading

def model_values(hf: dict, where: str) -> dict:
    """{config key: value} of seqjax's BERT experiments for a checkpoint's config.json."""
    def need(key, kind=int):
        value = hf.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: {key}={value!r}, expected a {kind.__name__}")
        return value

    if hf.get("model_type", "bert") != "bert":
        raise ValueError(f"{where}: model_type={hf['model_type']!r}, not a BERT")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{where}: position_embedding_type="
                         f"{hf['position_embedding_type']!r}; seqjax's BERT learns absolute "
                         f"positions")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError(f"{where}: a decoder (is_decoder / add_cross_attention), not BERT's "
                         f"encoder")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act={act!r}: expected one of {sorted(_ACTIVATIONS)}")
    return {"model.num_layers": need("num_hidden_layers"), "model.d_model": need("hidden_size"),
            "model.num_heads": need("num_attention_heads"),
            "model.ffn_hiddens": need("intermediate_size"),
            "model.max_position": need("max_position_embeddings"),
            "model.num_segments": need("type_vocab_size"), "model.norm": "post",
            "model.activation": _ACTIVATIONS[act],
            "model.norm_epsilon": float(hf.get("layer_norm_eps", 1e-12)),
            "model.dropout": float(hf.get("hidden_dropout_prob", 0.1)),
            "model.attention_dropout": float(hf.get("attention_probs_dropout_prob", 0.1)),
            "model.attention": "full", "data.vocab_size": need("vocab_size")}


def read_tokenizer(source: str):
    """The checkpoint's WordPiece tokenizer: its tokenizer.json, else one built from vocab.txt
    as BERT's (lower-casing unless tokenizer_config.json says `do_lower_case: false`)."""
    import tokenizers
    path = os.path.join(source, TOKENIZER)
    if files.exists(path):
        tokenizer = data_lib.tokenizer_from_json(files.read_text(path), repr(path))
    elif files.exists(os.path.join(source, VOCAB)):
        settings = os.path.join(source, "tokenizer_config.json")
        lower = (json.loads(files.read_text(settings)).get("do_lower_case", True)
                 if files.exists(settings) else True)
        vocab = [line.removesuffix("\r") for line in
                 files.read_text(os.path.join(source, VOCAB)).removesuffix("\n").split("\n")]
        wrapper = tokenizers.implementations.BertWordPieceTokenizer(
            {token: i for i, token in enumerate(vocab)}, lowercase=lower)
        tokenizer = data_lib.tokenizer_from_json(wrapper.to_str(), repr(source + "/" + VOCAB))
    else:
        raise FileNotFoundError(f"{source!r} holds neither {TOKENIZER} nor {VOCAB}")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def read_checkpoint(source: str) -> tuple[dict, dict, object]:
    """(config values, {seqjax parameter path: (Hugging Face name, its shape there, the array
    in seqjax's layout)}, tokenizer) of the Hugging Face BERT checkpoint in directory `source`.
    Arrays of heads the checkpoint lacks (a BertModel has no MLM or NSP head) are absent;
    `to_params` fills them in."""
    from safetensors.numpy import load as load_safetensors
    if not files.is_dir(source):
        raise FileNotFoundError(f"--source {source!r}: no such directory")
    missing = [f for f in (CONFIG, WEIGHTS) if not files.exists(os.path.join(source, f))]
    if missing:
        hint = (" (PyTorch's pytorch_model.bin is not read: save the model with "
                "safe_serialization, transformers' default)" if WEIGHTS in missing else "")
        raise FileNotFoundError(f"{source!r} lacks {' and '.join(missing)}{hint}")
    where = os.path.join(source, CONFIG)
    values = model_values(json.loads(files.read_text(where)), where)
    hf = {_base_name(k): v for k, v in
          load_safetensors(files.read_bytes(os.path.join(source, WEIGHTS))).items()}
    for tied, to in (("cls.predictions.decoder.weight", "embeddings.word_embeddings.weight"),
                     ("cls.predictions.decoder.bias", "cls.predictions.bias")):
        if tied in hf and not np.array_equal(hf.pop(tied), hf.get(to)):
            raise ValueError(f"{source}: {tied} differs from {to}; seqjax's MLM head shares "
                             f"the token embedding (and its bias)")
    H = values["model.num_heads"]
    arrays = {}
    for hf_name, ours, (to_ours, _) in _table(values["model.num_layers"]):
        if hf_name in hf:
            value = hf.pop(hf_name)
            try:
                arrays[ours] = (hf_name, value.shape, to_ours(value, H))
            except ValueError:  # a reshape into heads that does not divide
                raise ValueError(f"array {hf_name} has shape {value.shape}, which does not "
                                 f"split into num_attention_heads={H} heads") from None
    extra = sorted(set(hf) - set(_IGNORED))
    if extra:
        raise ValueError(f"{source}: array {extra[0]} {hf[extra[0]].shape} has no place in "
                         f"seqjax's BERT" + (f" (nor do {len(extra) - 1} more)"
                                             if len(extra) > 1 else ""))
    # A pooler needs the NSP head's place (a BertModel has the one and not the other).
    values["data.nsp"] = "nsp_head/kernel" in arrays or "pooler/Dense_0/kernel" in arrays
    tokenizer = read_tokenizer(source)
    if tokenizer.get_vocab_size() != values["data.vocab_size"]:
        raise ValueError(f"{source}: the tokenizer has {tokenizer.get_vocab_size()} tokens, "
                         f"config.json's vocab_size is {values['data.vocab_size']}")
    return values, arrays, tokenizer


def to_params(arrays: dict, fresh_params: dict) -> tuple[dict, list[str]]:
    """`fresh_params` (a fresh init, {'params': ...}) with `arrays` (`read_checkpoint`'s) in
    place; returns it and the top-level modules left fresh because the
    checkpoint lacks them (a BertModel's heads). The encoder must be complete, and every shape
    must fit."""
    flat = flax.traverse_util.flatten_dict(fresh_params["params"], sep="/")
    absent = sorted(p for p in flat if p.startswith("encoder/") and p not in arrays)
    if absent:
        raise ValueError(f"the checkpoint lacks the array of seqjax's {absent[0]}")
    for path, (name, shape, value) in arrays.items():
        if path not in flat:
            raise ValueError(f"array {name} has no place in this model ({path})")
        if value.shape != flat[path].shape:
            raise ValueError(f"array {name} has shape {shape}, which does not fit seqjax's "
                             f"{path} {flat[path].shape} (config.json and the arrays disagree)")
    fresh = sorted({p.split("/")[0] for p in flat} - {p.split("/")[0] for p in arrays})
    merged = {p: np.asarray(arrays[p][2], x.dtype) if p in arrays else x for p, x in flat.items()}
    return {"params": flax.traverse_util.unflatten_dict(merged, sep="/")}, fresh


# ------------------------------------------------------------------------------------ writing

def hf_config(config, vocab_size: int) -> dict:
    """config.json of a seqjax BERT run's config; refused where Hugging Face's BertModel
    computes otherwise."""
    m, d = config.model, config.data
    if config.task not in ("bert_pretrain", "bert_finetune"):
        raise ValueError(f"config.task={config.task!r}: only BERT runs export to Hugging Face's "
                         f"layout")
    if m.norm != "post" or m.attention != "full":
        raise ValueError(f"model.norm={m.norm!r}, model.attention={m.attention!r}: Hugging "
                         f"Face's BERT is post-norm with full attention; this model would "
                         f"compute something else there")
    act = {v: k for k, v in reversed(_ACTIVATIONS.items())}[m.activation]
    classifier = config.task == "bert_finetune"
    architecture = ("BertForSequenceClassification" if classifier
                    else "BertForPreTraining" if d.nsp else "BertForMaskedLM")
    out = dict(architectures=[architecture], model_type="bert", vocab_size=vocab_size,
               hidden_size=m.d_model, num_hidden_layers=m.num_layers,
               num_attention_heads=m.num_heads, intermediate_size=m.ffn_hiddens,
               hidden_act=act, max_position_embeddings=m.max_position,
               type_vocab_size=m.num_segments, layer_norm_eps=m.norm_epsilon,
               hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.attention_dropout,
               initializer_range=0.02, pad_token_id=data_lib.PAD_ID,
               position_embedding_type="absolute", tie_word_embeddings=True)
    if classifier:
        out.update(num_labels=d.num_classes, classifier_dropout=m.classifier_dropout)
    return out


def to_arrays(params: dict, num_layers: int) -> dict:
    """{Hugging Face name: array} of a seqjax BERT's parameters ({'params': ...})."""
    flat = {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(params["params"])}
    out = {}
    for hf_name, ours, (_, back) in _table(num_layers):
        if ours in flat:
            prefix = "" if hf_name.startswith(("cls.", "classifier.")) else "bert."
            out[prefix + hf_name] = np.ascontiguousarray(back(flat.pop(ours), None), np.float32)
    if flat:
        raise ValueError(f"parameter {sorted(flat)[0]} has no place in Hugging Face's BERT")
    return out


def _hf_tokenizer(tokenizer, max_length: int) -> tuple[str, str]:
    """(tokenizer.json, tokenizer_config.json) for transformers' BertTokenizerFast: the
    tokenizer with BERT's [CLS] A [SEP] (B [SEP]) template added."""
    from tokenizers import processors
    special = data_lib.special_ids(tokenizer)
    tokenizer = type(tokenizer).from_str(tokenizer.to_str())
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", special.sep),
                                                         ("[CLS]", special.cls))
    normalizer = json.loads(tokenizer.to_str()).get("normalizer") or {}
    settings = dict(tokenizer_class="BertTokenizerFast", model_max_length=max_length,
                    **{f"{k}_token": f"[{k.upper()}]" for k in ("pad", "unk", "cls", "sep",
                                                               "mask")})
    if normalizer.get("type") == "BertNormalizer":  # else transformers would lower-case
        settings.update(do_lower_case=normalizer.get("lowercase", True),
                        strip_accents=normalizer.get("strip_accents"))
    return tokenizer.to_str(), json.dumps(settings, indent=2)


def write_checkpoint(config, params: dict, tokenizer, out: str) -> dict:
    """Writes config.json, model.safetensors, tokenizer.json and tokenizer_config.json of a
    seqjax BERT run (pretraining or fine-tuned: its `config`) into directory `out` (process
    0); returns {name: shape} of the arrays written."""
    from safetensors.numpy import save as save_safetensors
    hf = hf_config(config, tokenizer.get_vocab_size())
    arrays = to_arrays(params, config.model.num_layers)
    tokenizer_json, settings = _hf_tokenizer(tokenizer, config.model.max_position)
    files.makedirs(out)
    for name, data in ((CONFIG, json.dumps(hf, indent=2)), (TOKENIZER, tokenizer_json),
                       ("tokenizer_config.json", settings),
                       (WEIGHTS, save_safetensors(arrays, metadata={"format": "pt"}))):
        files.write_from_process_0(os.path.join(out, name), data)
    return {name: x.shape for name, x in arrays.items()}

