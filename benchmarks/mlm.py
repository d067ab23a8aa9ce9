r"""Training-step throughput of seqjax's BERT pretraining model against the same model written
with Flax's own layers.

    python benchmarks/mlm.py                  # BERT-Small at B=32, L=128: minutes on 2 CPU cores
    python benchmarks/mlm.py --smoke          # tiny sizes and 2 repeats, a smoke test (seconds)
    python benchmarks/mlm.py --profile        # also where each build's step spends its time
    python benchmarks/mlm.py --batch_size=64 --repeats=15 --dropout=0 --attention_dropout=0

The model is BERT-Small shaped by default (4 layers, d_model E=512, 8 heads, FFN F=2048,
vocabulary V=8000, a 512-row learned position table), pretrained with masked language
modelling on P=20 chosen positions per sequence and next-sentence prediction, as
`seqjax.tasks.bert.build_pretrain` trains it. Two builds with identical shapes and the same
number of parameters (both counts are printed, and asserted equal):

- seqjax: `seqjax.nn.bert.BertPretraining(BertEncoder(...), nsp=True)` (the reference row);
- flax layers: the same post-norm architecture written in this file with Flax's
  `nn.MultiHeadDotProductAttention`, `nn.Dense`, `nn.LayerNorm`, `nn.Embed` and `nn.Dropout`:
  token + segment + learned position embeddings, LayerNorm, dropout; per block
  x = LN(x + dropout(attention(x))), x = LN(x + dropout(FFN(x))) with GELU; the MLM head
  (Dense(E), GELU, LayerNorm, then `embed.attend`, the tied token embedding, plus a bias) on
  the gathered positions; the pooler (tanh Dense on position 0) and a Dense(2) NSP head.

Flax's attention draws by default one dropout mask for the whole batch and every head
(`broadcast_dropout=True`), seqjax one per example and head. The flax build uses
`broadcast_dropout=False` by default, so both builds do the same computation;
--flax_broadcast_dropout measures Flax's default instead (fewer random bits to draw).

One training step: loss = mean cross-entropy over the P positions (all weights 1) + mean NSP
cross-entropy, `jax.value_and_grad` w.r.t. the parameters, an optax adamw update, jitted with
the (params, optimiser state, step) state donated; dropout (--dropout on the embeddings and
each sublayer's output, --attention_dropout on the attention weights, the real config's 0.1
both) draws its key from the step number. Inputs are fixed random integers: tokens, segments,
NSP labels, MLM targets, and P distinct positions per row (sorted); the padding mask is all
True. float32 throughout.

Timing: each build is compiled ahead of time; then the builds run in turn, 2 warm-up rounds
and then --repeats timed rounds, so that a change of load on a shared machine hits both alike.
A round runs --steps consecutive steps of each build (2 warm-up steps at the default
--steps=1); a sample is their wall time (outputs ready) / --steps.

Columns: ms/step (the median over rounds, and the best); tokens/s = B * L / median seconds;
"vs seqjax" = this row's tokens/s / seqjax's, as the median over rounds of (seqjax's time /
this row's time in the same round): above 1.00x the row is faster than seqjax; GFLOP/s =
matmul FLOPs per step / median seconds; "% peak" = that as a percentage of the matmul peak,
a jitted float32 P x P @ P x P matmul (P = --peak_size, best of 3), measured before and after
the timing; the table uses the higher.

FLOPs per step count only the matrix products actually performed: 3x the forward's (the
backward does two products of the forward's size for each, the gradients w.r.t. the input and
the weight; this includes the backward of the tied projection into the embedding). Forward,
per layer: the Q, K, V and output projections 4 * 2BLE^2, the attention scores and weighted
values 2 * 2BL^2E, the FFN 2 * 2BLEF; the MLM head on P positions: the transform 2BPE^2 and
the tied projection 2BPEV; the pooler and NSP head 2BE^2 + 2BE*2. The embedding lookups are
gathers, not matmuls. (6 x parameters x tokens would overstate the work: the head runs on P,
not L, positions, and the embedding tables are not multiplied by anything in the encoder.)

After the table, the targets: seqjax at least 1.0x the Flax-layers model's tokens/s, that is
the Flax row's "vs seqjax" (the same number as in the table) at most 1.00x; and seqjax at
least 55% of the matmul peak. Absolute numbers move with the machine's load; the
ratio is the more reliable result.
"""

import collections
import functools
import re
import statistics
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from seqjax.nn.bert import BertEncoder, BertPretraining

from common import (
    PEAK_SIZE,
    environment,
    interleaved_times,
    load_average,
    matmul_peak,
    op_profile,
    paired_median,
    verdict,
)

flags.DEFINE_integer("batch_size", 32, "Batch size B (sequences per step).")
flags.DEFINE_integer("seq_len", 128, "Sequence length L.")
flags.DEFINE_integer("predictions", 20, "MLM positions P per sequence (the head runs on these).")
flags.DEFINE_integer("vocab_size", 8000, "Vocabulary size V.")
flags.DEFINE_integer("layers", 4, "Encoder layers (BERT-Small: 4).")
flags.DEFINE_integer("d_model", 512, "Model width E (BERT-Small: 512).")
flags.DEFINE_integer("heads", 8, "Attention heads (BERT-Small: 8).")
flags.DEFINE_integer("ffn", 2048, "FFN hidden width F (BERT-Small: 2048).")
flags.DEFINE_integer("max_position", 512, "Rows of the learned position table (parameters "
                     "only; the real config's 512).")
flags.DEFINE_float("dropout", 0.1, "Dropout on the embeddings and each sublayer's output, "
                   "both builds.")
flags.DEFINE_float("attention_dropout", 0.1, "Dropout on the attention weights, both builds.")
flags.DEFINE_bool("flax_broadcast_dropout", False, "Flax attention's default: one attention "
                  "dropout mask shared by the batch and heads (seqjax draws one per example "
                  "and head). Off: both builds draw the same masks' worth of random bits.")
flags.DEFINE_integer("repeats", 10, "Timed rounds; each runs both builds once in turn.")
flags.DEFINE_integer("steps", 1, "Training steps per timed sample (the sample is their mean).")
flags.DEFINE_integer("peak_size", PEAK_SIZE, "P of the P x P @ P x P float32 matmul that "
                     "measures the machine's peak FLOP rate.")
flags.DEFINE_bool("smoke", False, "Tiny sizes and 2 repeats, a smoke test.")
flags.DEFINE_bool("profile", False, "After the targets, where each build's step spends its time "
                  "(matmuls, dropout's random bits, layer norm, the rest), from a jax.profiler "
                  "trace.")
FLAGS = flags.FLAGS

SEQJAX, FLAX = "seqjax BertPretraining", "flax layers"
SPEED_TARGET, PEAK_TARGET = 1.0, 0.55


# ----------------------------------------------------------------------------- the flax build

class FlaxBlock(nn.Module):
    """A post-norm encoder block from Flax's layers: x = LN(x + dropout(MHA(x))),
    x = LN(x + dropout(Dense(gelu(Dense(x)))))."""

    num_heads: int
    ffn: int
    dropout: float
    attention_dropout: float
    broadcast_dropout: bool

    @nn.compact
    def __call__(self, x_BxLxE, mask_Bx1x1xL, *, deterministic: bool):
        E = x_BxLxE.shape[-1]
        y = nn.MultiHeadDotProductAttention(
            self.num_heads, dropout_rate=self.attention_dropout,
            broadcast_dropout=self.broadcast_dropout, name="attention")(
                x_BxLxE, mask=mask_Bx1x1xL, deterministic=deterministic)
        y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
        x_BxLxE = nn.LayerNorm(name="ln1")(x_BxLxE + y)
        y = nn.Dense(E, name="dense2")(nn.gelu(nn.Dense(self.ffn, name="dense1")(x_BxLxE)))
        y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
        return nn.LayerNorm(name="ln2")(x_BxLxE + y)


class FlaxBert(nn.Module):
    """BERT pretraining from Flax's layers, the shapes of seqjax's `BertPretraining` with
    `nsp=True`: (mlm_logits [B, P, V], nsp_logits [B, 2]), float32."""

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    ffn: int
    max_position: int
    dropout: float
    attention_dropout: float
    broadcast_dropout: bool

    @nn.compact
    def __call__(self, tokens_BxL, segments_BxL, mask_BxL, positions_BxP, *,
                 deterministic: bool = True):
        L = tokens_BxL.shape[1]
        init = nn.initializers.normal(0.02)
        token_embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=init,
                               name="token_embed")
        x = (token_embed(tokens_BxL)
             + nn.Embed(2, self.d_model, embedding_init=init, name="segment_embed")(segments_BxL)
             + nn.Embed(self.max_position, self.d_model, embedding_init=init,
                        name="position_embed")(jnp.arange(L)[None, :]))
        x = nn.Dropout(self.dropout)(nn.LayerNorm(name="embed_ln")(x),
                                     deterministic=deterministic)
        mask_Bx1x1xL = mask_BxL[:, None, None, :]
        for i in range(self.num_layers):
            x = FlaxBlock(self.num_heads, self.ffn, self.dropout, self.attention_dropout,
                          self.broadcast_dropout, name=f"block{i}")(
                              x, mask_Bx1x1xL, deterministic=deterministic)
        # MLM head on the P chosen positions, tied to the token embedding.
        h = jnp.take_along_axis(x, positions_BxP[..., None], 1)
        h = nn.LayerNorm(name="mlm_ln")(nn.gelu(nn.Dense(self.d_model, name="mlm_transform")(h)))
        mlm_bias = self.param("mlm_bias", nn.initializers.zeros, (self.vocab_size,))
        mlm_logits = token_embed.attend(h) + mlm_bias
        pooled = jnp.tanh(nn.Dense(self.d_model, name="pooler")(x[:, 0]))
        nsp_logits = nn.Dense(2, name="nsp_head")(pooled)
        return mlm_logits.astype(jnp.float32), nsp_logits.astype(jnp.float32)


def make_models(cfg):
    seqjax_model = BertPretraining(
        BertEncoder(cfg["V"], num_layers=cfg["layers"], d_model=cfg["E"], num_heads=cfg["H"],
                    ffn_hiddens=cfg["F"], max_length=cfg["max_position"],
                    dropout_rate=cfg["dropout"], attention_dropout_rate=cfg["attention_dropout"],
                    norm="post", attention="full"),
        nsp=True)
    flax_model = FlaxBert(cfg["V"], cfg["layers"], cfg["E"], cfg["H"], cfg["F"],
                          cfg["max_position"], cfg["dropout"], cfg["attention_dropout"],
                          cfg["broadcast_dropout"])
    return {SEQJAX: seqjax_model, FLAX: flax_model}


# ----------------------------------------------------------------------------- the train step

def make_batch(B, L, P, V, seed=0):
    rng = np.random.default_rng(seed)
    positions = np.sort(np.stack([rng.permutation(L)[:P] for _ in range(B)]), axis=1)
    return dict(
        tokens=jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32),
        segments=jnp.asarray((np.arange(L)[None, :] >= L // 2).repeat(B, 0), jnp.int32),
        mask=jnp.ones((B, L), bool),
        positions=jnp.asarray(positions, jnp.int32),
        targets=jnp.asarray(rng.integers(0, V, (B, P)), jnp.int32),
        nsp_labels=jnp.asarray(rng.integers(0, 2, (B,)), jnp.int32))


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def make_step(model, batch, steps: int):
    """(run, last_loss, parameter count) of the compiled training step, with the state
    (params, adamw state, step number) donated: run() runs `steps` training steps from the
    build's current state and blocks until they are done (a step for `interleaved_times`);
    last_loss() is the loss of the latest one (None before any)."""
    params = jax.jit(functools.partial(model.init, deterministic=True))(
        jax.random.PRNGKey(0), batch["tokens"], batch["segments"], batch["mask"],
        batch["positions"])
    optimizer = optax.adamw(1e-4, b1=0.9, b2=0.98, weight_decay=0.01)
    state = (params, optimizer.init(params), jnp.zeros((), jnp.int32))
    dropout_key = jax.random.PRNGKey(1)

    def loss_fn(params, batch, rng):
        mlm_logits, nsp_logits = model.apply(
            params, batch["tokens"], batch["segments"], batch["mask"], batch["positions"],
            deterministic=False, rngs={"dropout": rng})
        mlm = optax.softmax_cross_entropy_with_integer_labels(mlm_logits, batch["targets"])
        nsp = optax.softmax_cross_entropy_with_integer_labels(nsp_logits, batch["nsp_labels"])
        return jnp.mean(mlm) + jnp.mean(nsp)

    def train_step(state, batch):
        params, opt_state, step = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch,
                                                   jax.random.fold_in(dropout_key, step))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, step + 1), loss

    compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
    loss = None

    def run():
        nonlocal state, loss
        for _ in range(steps):
            state, loss = compiled(state, batch)
        jax.block_until_ready((state, loss))

    def profile():  # op_profile runs the step several times on one state: a build without
        # donation, otherwise the same program as the timed one
        return op_profile(jax.jit(train_step).lower(state, batch).compile(), (state, batch))

    return run, lambda: loss, count_params(params), profile


# (label, pattern of the JAX op_name) of the non-matmul ops that --profile reports apart
PROFILE_PARTS = [("random bits for dropout", r"bernoulli|uniform|threefry|random_bits"),
                 ("layer norm", r"(^|/)(ln\w*|\w*_ln|LayerNorm\w*)/")]
OTHER_OPS = "other elementwise, copies and reductions"


def print_profile(profiles: dict, flops: float):
    """Per build: the step's op time by part (matmuls, dropout's random bits, layer norm, the
    rest), and its largest non-matmul ops."""
    rows = {}
    for name, ops in profiles.items():
        parts = collections.Counter()
        for ms, _, is_matmul, op_name in ops.values():
            label = "matmuls" if is_matmul else next(
                (label for label, pattern in PROFILE_PARTS if re.search(pattern, op_name)),
                OTHER_OPS)
            parts[label] += ms
        rows[name] = parts
    labels = ["matmuls"] + [label for label, _ in PROFILE_PARTS] + [OTHER_OPS]
    print("\nWhere the step goes (--profile: op times of a jax.profiler trace of the step "
          "compiled without donation, ms per step, summed over ops and threads):\n")
    print("| part | " + " | ".join(rows) + " |")
    print("|" + " --- |" * (len(rows) + 1))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{parts[label]:,.1f}" for parts in rows.values())
              + " |")
    print("| total | " + " | ".join(f"{sum(parts.values()):,.1f}" for parts in rows.values())
          + " |")
    print("| matmul GFLOP/s | " + " | ".join(
        f"{flops / parts['matmuls'] / 1e6:,.1f}" if parts["matmuls"] else "-"
        for parts in rows.values()) + " |")
    for name, ops in profiles.items():
        print(f"\n{name}: the largest non-matmul ops (ms per step, JAX op):")
        top = sorted((v for v in ops.values() if not v[2]), key=lambda v: -v[0])[:8]
        for ms, _, _, op_name in top:
            print(f"  {ms:7.1f}  {op_name}")


def matmul_flops(B, L, P, E, F, V, layers) -> float:
    """Matrix-product FLOPs of one training step: 3x the forward's."""
    per_layer = 4 * 2 * B * L * E * E + 2 * 2 * B * L * L * E + 2 * 2 * B * L * E * F
    head = 2 * B * P * E * E + 2 * B * P * E * V + 2 * B * E * E + 2 * B * E * 2
    return 3.0 * (layers * per_layer + head)


# ----------------------------------------------------------------------------- main

def main(argv):
    del argv
    start = time.perf_counter()
    if FLAGS.smoke:
        cfg = dict(B=4, L=32, P=5, V=500, layers=2, E=64, H=4, F=256, max_position=64)
        repeats, steps, peak_size = 2, 1, 256
    else:
        cfg = dict(B=FLAGS.batch_size, L=FLAGS.seq_len, P=FLAGS.predictions, V=FLAGS.vocab_size,
                   layers=FLAGS.layers, E=FLAGS.d_model, H=FLAGS.heads, F=FLAGS.ffn,
                   max_position=FLAGS.max_position)
        repeats, steps, peak_size = FLAGS.repeats, FLAGS.steps, FLAGS.peak_size
    cfg.update(dropout=FLAGS.dropout, attention_dropout=FLAGS.attention_dropout,
               broadcast_dropout=FLAGS.flax_broadcast_dropout)
    B, L, P, V, E, H, F = (cfg[k] for k in "B L P V E H F".split())
    if E % H:
        raise app.UsageError(f"--d_model={E} is not divisible by --heads={H}")
    if P > L:
        raise app.UsageError(f"--predictions={P} exceeds --seq_len={L}")
    if L > cfg["max_position"]:
        raise app.UsageError(f"--seq_len={L} exceeds --max_position={cfg['max_position']}")
    if repeats < 1 or steps < 1:
        raise app.UsageError("--repeats and --steps must be >= 1")

    print(environment((jax, flax, optax), [load_average()]))
    peaks = [matmul_peak(peak_size)]
    print(f"matmul peak before: float32 [{peak_size}, {peak_size}] @ [{peak_size}, {peak_size}],"
          f" best of 3: {peaks[0] / 1e9:.1f} GFLOP/s")

    batch = make_batch(B, L, P, V)
    runs, losses, counts, profiles, compile_s = {}, {}, {}, {}, {}
    for name, model in make_models(cfg).items():
        t0 = time.perf_counter()
        runs[name], losses[name], counts[name], profiles[name] = make_step(model, batch, steps)
        compile_s[name] = time.perf_counter() - t0
    print(f"parameters: {SEQJAX} {counts[SEQJAX]:,}, {FLAX} {counts[FLAX]:,}; compile "
          + ", ".join(f"{name} {s:.1f} s" for name, s in compile_s.items()))
    assert counts[SEQJAX] == counts[FLAX], (
        f"parameter counts differ: {counts} (the builds are not the same model)")

    times = {name: [t / steps for t in ts]  # 2 warm-up rounds, then the timed rounds
             for name, ts in interleaved_times(runs, repeats).items()}
    peaks.append(matmul_peak(peak_size))
    peak = max(peaks)
    flops = matmul_flops(B, L, P, E, F, V, cfg["layers"])

    print(f"matmul peak after: {peaks[1] / 1e9:.1f} GFLOP/s; the table uses the higher, "
          f"{peak / 1e9:.1f} GFLOP/s; {load_average()}")
    print(f"\nfloat32; B={B}, L={L}, P={P}, V={V}, layers={cfg['layers']}, E={E}, heads={H}, "
          f"F={F}, position table {cfg['max_position']}; dropout {cfg['dropout']:g}, attention "
          f"dropout {cfg['attention_dropout']:g} (flax broadcast_dropout="
          f"{cfg['broadcast_dropout']}); adamw; {repeats} rounds of {steps} step(s) each after "
          f"{2 * steps} warm-up steps; matmul FLOPs per step {flops / 1e9:.2f} G "
          f"(3x forward). ms/step: median (best); vs seqjax: median over rounds of seqjax's "
          f"time / this row's (above 1.00x: faster than seqjax).\n")
    header = ["build", "ms/step", "best ms/step", "tokens/s", "vs seqjax", "GFLOP/s", "% peak",
              "final loss"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    vs_seqjax = {}  # the column, also the speed target: median of seqjax's time / the row's
    for name in runs:
        median, best = statistics.median(times[name]), min(times[name])
        vs_seqjax[name] = paired_median(times[SEQJAX], times[name])
        print(f"| {name} | {1e3 * median:,.1f} | {1e3 * best:,.1f} | {B * L / median:,.0f} | "
              f"{vs_seqjax[name]:.2f}x | {flops / median / 1e9:,.1f} | "
              f"{100 * flops / median / peak:.1f} | {float(losses[name]()):.3f} |")

    rate = flops / statistics.median(times[SEQJAX])
    print(f"\nTargets{' (smoke sizes: not the real measurement)' if FLAGS.smoke else ''}:")
    print(f"  seqjax >= {SPEED_TARGET:.1f}x the Flax-layers model's tokens/s, i.e. the "
          f"{FLAX} row's 'vs seqjax' <= {1 / SPEED_TARGET:.2f}x: "
          f"{verdict(vs_seqjax[FLAX] <= 1 / SPEED_TARGET)}, {vs_seqjax[FLAX]:.2f}x (as in the "
          f"table: median over rounds of seqjax's time / flax's)")
    print(f"  seqjax >= {100 * PEAK_TARGET:.0f}% of the matmul peak: "
          f"{verdict(rate >= PEAK_TARGET * peak)}, {100 * rate / peak:.1f}% "
          f"({rate / 1e9:.1f} of {peak / 1e9:.1f} GFLOP/s)")
    if FLAGS.profile:
        print_profile({name: profile() for name, profile in profiles.items()}, flops)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    app.run(main)
