"""Writes tests/data/hf_bert: a small BERT checkpoint directory made by Hugging Face
`transformers` (config.json, model.safetensors, vocab.txt, tokenizer.json,
tokenizer_config.json) and `reference.npz`, what its PyTorch model computes for fixed inputs.
seqjax's import is tested against it (tests/test_hf_bert.py) without `transformers`, which is
not a dependency of seqjax. Run once, with torch and transformers installed:

    python tests/make_hf_bert_fixture.py                # writes the fixture
    python tests/make_hf_bert_fixture.py --check DIR    # loads DIR (a `--mode export --format hf`
                                                        # of the imported fixture) and compares

The vocabulary is WordPiece trained on the first lines of the shipped WikiText-2 training split,
laid out as Google's releases are: [PAD] 0, unused slots, then [UNK] [CLS] [SEP] [MASK] at ids
5-8. Every parameter is the random initialisation plus noise, so that LayerNorm scales and
biases are not ones and zeros (a swapped pair would go unnoticed). The tied MLM decoder is
saved once, as transformers saves tied weights.
"""

import argparse
import gzip
import pathlib

import numpy as np
import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "hf_bert"
SAMPLE = ["The game's graphics were praised, though the story was called unremarkable.",
          "Valkyria Chronicles III is a tactical role @-@ playing game !"]
CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu",
              layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def _vocabulary(path: pathlib.Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    text = gzip.decompress((ROOT / "seqjax/data/wikitext2/wiki.train.tokens.gz").read_bytes())
    lines = [line for line in text.decode("utf-8").splitlines()[:400] if line.strip()]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=300))
    pieces = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    specials = ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ordered = ["[PAD]", *[f"[unused{i}]" for i in range(4)], *specials,
               *[p for p in pieces if p not in specials]]
    path.write_text("\n".join(ordered) + "\n", encoding="utf-8")


def _inputs(tokenizer):
    encoded = tokenizer(SAMPLE, padding=True, return_tensors="np")
    token_type_ids = encoded["token_type_ids"].copy()
    token_type_ids[0, 5:encoded["attention_mask"][0].sum()] = 1  # a B segment in row 0
    return dict(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                token_type_ids=token_type_ids)


def _outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v).long() for k, v in inputs.items()},
                    output_hidden_states=True)
        pooled = model.bert.pooler(out.hidden_states[-1])
    return dict(last_hidden_state=out.hidden_states[-1].numpy(), pooler_output=pooled.numpy(),
                prediction_logits=out.prediction_logits.numpy(),
                seq_relationship_logits=out.seq_relationship_logits.numpy())


def write():
    OUT.mkdir(parents=True, exist_ok=True)
    _vocabulary(OUT / "vocab.txt")
    tokenizer = transformers.BertTokenizerFast(str(OUT / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(str(OUT))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, **CONFIG)
    model = transformers.BertForPreTraining(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(OUT))
    inputs = _inputs(tokenizer)
    np.savez(OUT / "reference.npz", **inputs, **_outputs(model, inputs),
             sample_ids=np.asarray(tokenizer(SAMPLE[0])["input_ids"]))
    print(f"wrote {OUT}: {sorted(p.name for p in OUT.iterdir())}")


def check(directory: str):
    """What transformers computes with an exported checkpoint against the reference."""
    reference = np.load(OUT / "reference.npz")
    model = transformers.BertForPreTraining.from_pretrained(directory)
    transformers.BertModel.from_pretrained(directory)  # the load, with no error
    inputs = {k: reference[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    outputs = _outputs(model, inputs)
    valid = inputs["attention_mask"].astype(bool)
    for name, value in outputs.items():
        want = reference[name]
        if value.ndim == 3:
            value, want = value[valid], want[valid]
        print(f"{name}: max |exported - original| = {np.max(np.abs(value - want)):.3g}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", help="an exported checkpoint directory to compare")
    args = parser.parse_args()
    check(args.check) if args.check else write()
