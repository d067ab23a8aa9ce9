"""Plain-NumPy references of the layers that several model tests check against."""

import numpy as np


def layer_norm(x, p, eps=1e-6):
    """LayerNorm with Flax's parameter names (`scale`, `bias`) over the last axis."""
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def attention(p, x_q, x_kv, allowed_QxK):
    """Multi-head attention with loops over heads and queries: softmax(q k / sqrt(D)) v, with
    seqjax's parameter names (`W_q`, `W_k`, `W_v` kernels [E, H, D], `W_o` [H, D, E])."""
    out = np.zeros((x_q.shape[0], p["W_o"]["kernel"].shape[-1]))
    for h in range(p["W_q"]["kernel"].shape[1]):
        q, k, v = (x @ p[n]["kernel"][:, h] + p[n]["bias"][h]
                   for n, x in (("W_q", x_q), ("W_k", x_kv), ("W_v", x_kv)))
        for i in range(len(x_q)):
            scores = np.where(allowed_QxK[i], k @ q[i] / np.sqrt(q.shape[-1]), -np.inf)
            w = np.exp(scores - scores.max())
            out[i] += (w / w.sum()) @ v @ p["W_o"]["kernel"][h]
    return out + p["W_o"]["bias"]
