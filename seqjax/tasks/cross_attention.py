"""What a translation model's cross-attention looks at, and whether it aligns.

`cross_attention_weights` reads the weights each target position puts on the source positions:
the recurrent decoder's additive attention, or the Transformer's last decoder layer averaged
over heads. `alignment` scores them against hand-labelled word alignments
(`data_lib.load_alignments`, 30 shipped test pairs): the fraction of links (source word,
target word) for which the target word's most-attended source word is the linked one, with the
reference target fed to the decoder (teacher forcing), so that every model is scored on the
same target words.

Dimension letters: N sentences, T target length, S source length.
"""

import numpy as np

from seqjax.data import translation as data_lib
from seqjax.nn.transformer import EncoderDecoder


def cross_attention_weights(model: EncoderDecoder, params, src_NxS, src_len_N, tgt_in_NxT):
    """[N, T, S] weights of each target position over the source (row t: the attention from
    which target token t is predicted)."""
    _, variables = model.apply(params, src_NxS, src_len_N, tgt_in_NxT, mutable=["intermediates"])
    decoder = variables["intermediates"]["decoder"]
    if "step" in decoder:  # [T, N, 1, S]
        return np.asarray(decoder["step"]["attention"]["attention_weights"][0][:, :, 0]
                          ).transpose(1, 0, 2)
    last = decoder[f"block{model.decoder.num_layers - 1}"]  # [N, H, T, S]
    return np.asarray(last["cross_attention"]["attention_weights"][0].mean(1))


def alignment_accuracy(weights_NxTxS, src_len_N, links) -> float:
    """The fraction of links (i, j) of sentence n for which source word i has the largest of
    sentence n's weights in row j, over its valid source positions (`<eos>` included)."""
    hits = [int(np.argmax(w[j, :length])) == i
            for w, length, pairs in zip(weights_NxTxS, src_len_N, links) for i, j in pairs]
    return float(np.mean(hits))


def alignment(model: EncoderDecoder, params, src_tok, tgt_tok, examples,
              num_steps: int) -> dict:
    """`alignment` (see `alignment_accuracy`) of `examples` (source, target, links), and the
    number of links it counts, `alignment_links`: those within the first `num_steps - 1`
    words of both sentences ({} if none is). Word tokenizers only (a link names words)."""
    if src_tok.kind != "word" or tgt_tok.kind != "word":
        raise ValueError("alignments link words: they need data.tokenizer='word'")
    kept = [[(i, j) for i, j in pairs if max(i, j) < num_steps - 1] for _, _, pairs in examples]
    if not any(kept):
        return {}
    src, src_len = data_lib.build_array([src_tok.encode(s) for s, _, _ in examples], num_steps)
    tgt, tgt_len = data_lib.build_array([tgt_tok.encode(t) for _, t, _ in examples], num_steps)
    rows = data_lib.teacher_forcing(dict(src=src, src_len=src_len, tgt=tgt, tgt_len=tgt_len))
    weights = cross_attention_weights(model, params, src, src_len, rows["tgt_in"])
    return dict(alignment=alignment_accuracy(weights, src_len, kept),
                alignment_links=sum(map(len, kept)))
