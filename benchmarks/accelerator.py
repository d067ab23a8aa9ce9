r"""One command for a GPU (or TPU) lease: training-step throughput, memory and model FLOPs
utilisation of seqjax's models, in a few minutes, with a JSON of every figure.

    python benchmarks/accelerator.py --out accelerator.json    # about 5 minutes on one H200
    python benchmarks/accelerator.py --quick --out /tmp/a.json # tiny shapes: a CPU smoke test
    python benchmarks/accelerator.py --rows=attention,linear   # rerun some groups
    python benchmarks/accelerator.py --rows=memory             # the remat memory target only
    python benchmarks/accelerator.py --rows=bert --profile="L=512 B=64 remat=block"

Accelerator time is scarce, so everything runs in one process. A group's rows are compiled ahead
of time, --compile_threads at once (a BERT-base training step takes about 40 s in XLA's compiler
on an H200's host, and the GIL is released there; XLA autotunes kernels on the GPU while it
compiles, so rows compiling side by side share the GPU in their autotuning:
--compile_threads=1 avoids that, at several times the compile time), then timed one after
another with nothing else running: 2 warm-up steps and a few timed ones. A row that fails (out
of memory, a cuDNN configuration this JAX does not take) becomes one line of the table and the
others go on. Progress lines are flushed as they happen and the JSON is rewritten after every
row, so a run killed at its time limit leaves what it measured.

Profiles: the BERT rows at the first sequence length without remat (BERT-base at L = 128, the
MFU target's rows), and any others named by --profile, are traced for 2 more steps after they
are timed, and their ops are summed by JAX op name with repeated layers merged
(`seqjax.profiling.op_totals`): the step's time in ops, its share in matrix products and the
slowest ops go into the JSON and are printed after the table, so that one run says where a
step's time goes as well as how much there is.

Row groups (--rows, run in the order given):
- bert: a BERT-base MLM pretraining step (`seqjax.nn.bert.BertPretraining` built by
  `seqjax.tasks.bert.make_encoder` from experiments/bert_pretrain.py's config; the loss is
  `seqjax.tasks.bert.pretraining_loss`, which draws the mask inside the step and runs the MLM head
  on the P = ceil(0.15 L) chosen positions; AdamW with clipping from
  `seqjax.train.optimizer.make_optimizer`; value_and_grad and update jitted on one device with the
  state donated), bfloat16 computation on float32 parameters, vocabulary 30,522 (BERT's
  WordPiece), at L = 128 and 512 with 32,768 tokens per step, for remat 'none' and 'block' and
  attention_impl 'xla' and 'cudnn' (`jax.nn.dot_product_attention`). Attention dropout is 0 in
  every row (the fused implementations have none); dropout 0.1 elsewhere, as configured.
- translation: the Transformer encoder-decoder of `seqjax.tasks.translation.make_model`
  (experiments/translate.py's config at base size: d_model 512, 6 + 6 layers, 8 heads, FFN 2048,
  vocabulary 8,000 each side, source and target 128 tokens), bfloat16, attention_impl 'auto'.
- lstm: a 1-layer LSTM, H = 1024, T = 128, batch 64, float32 (cuDNN's RNN takes no bfloat16),
  value_and_grad of mean(outputs**2) w.r.t. the parameters and the inputs as in recurrent.py:
  seqjax `StackedRecurrent`, Flax `nn.RNN(nn.OptimizedLSTMCell)`, and cuDNN's LSTM through
  `jax.experimental.rnn.lstm` (GPU only: 'n/a' elsewhere).
- attention: forward plus backward (jax.grad of sum(out * a fixed cotangent) w.r.t. q, k, v) of
  causal self-attention, B = 1, 8 heads, D = 64, bfloat16, at N = 4k, 16k, 64k: seqjax
  `dot_product_attention` (full, with an [N, N] mask; skipped with the size of its float32
  [B, H, N, N] scores where they would take half the device's memory), cuDNN's flash attention,
  cuDNN's sliding window (`local_window_size=(255, 0)`), and seqjax `local_attention`
  (block 256, look_back 1). cuDNN rows are 'n/a' off NVIDIA GPUs.
- linear: linear_recurrent.py's T-sweep at fixed tokens per batch (batch = tokens // T):
  seqjax's LSTM against minGRU and the LRU (`LinearRecurrentStack`, associative and sequential
  scans), H = 1024, float32, T = 512, 4096, 16384. A row whose step took over
  --max_step_seconds is not run at the longer lengths.
- memory: compile only. The compiled temporary memory (XLA's memory analysis) of a BERT-Small
  MLM training step (BERT_SIZES['small'], experiments/bert_pretrain.py's config otherwise) at
  L = 512, batch 8, for remat 'none', 'block' and 'full', and each one's ratio to 'none'; the
  target is 'block' at most 40% of 'none'. On a CPU the whole run then compiles with XLA:CPU's
  memory-minimising scheduler (MEMORY_XLA_FLAGS).

Columns. ms/step: the median of the timed steps, each blocked until its outputs are ready (at
most --steps, fewer for a row slower than --row_seconds / --steps). tokens/s: tokens per step /
that. Memory: XLA's `compiled.memory_analysis()`, temp (the executable's own buffers) and total
= temp + arguments + outputs - aliased (donated state counted once); 'device peak' is
`memory_stats()['peak_bytes_in_use']` where the backend has it, a high-water mark of the whole
process that cannot be reset between rows (so it only says something where it rises).

Model FLOPs utilisation (MFU) = model FLOPs per step / step time, against two peaks of the chip in
dense bfloat16: the one measured in this run (a jitted bfloat16 P x P @ P x P matmul, P = 8192 on
an accelerator, the best of 3 rounds of 10) and the datasheet's (`DATASHEET_BF16`, looked up by
`device_kind`; None for a chip not in the table). Model FLOPs are counted analytically, not taken
from XLA's cost analysis, which counts what the compiled program executes, rematerialised
recomputation included: MFU is the useful work only, so remat shows as a lower MFU.
- Dense layers: 6 x (matrix parameters) x (the tokens they run on): per encoder layer 4E^2 + 2EF
  on every token; the MLM head's transform E^2 and tied projection EV on the P chosen positions;
  pooler and NSP head on one position per sequence; the decoder's self-attention and FFN on the
  target tokens, its cross-attention's query and output projections on the target tokens and key
  and value projections on the source tokens; the translation head EV on the target tokens.
  Embedding lookups are gathers, not products.
- Attention in the models: 12 x layers x L x E per token (scores and weighted values, 2 x 2LE
  forward, times 3 for forward plus backward), not halved for causal masking.
- The recurrent rows: 6 x (matrix parameters) x tokens (the LSTM: 6 x 4H(F + H)); the scans'
  elementwise work is not counted.
- The attention rows count the useful products: 4 x B x H x D x (query-key pairs a query sees:
  N(N+1)/2 causal, at most 256 per query in the sliding window, its block and the one before
  for local attention) forward, and 3x that forward plus backward (the backward's four products
  of the forward's size; FlashAttention's recomputation of the scores is not counted).
The float32 rows (lstm, linear) are held against the bfloat16 peak too: their MFU says how far
they are from what the chip can do, not from a float32 peak.
"""

import functools
import math
import os
import time
import traceback

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from seqjax.config import load_experiment
from seqjax.data import masking
from seqjax.data import pretraining as pretraining_data
from seqjax.nn.attention import dot_product_attention, local_attention
from seqjax.nn.bert import BertPretraining
from seqjax.nn.recurrent import StackedRecurrent
from seqjax.tasks import bert as bert_task
from seqjax.tasks import translation as translation_task
from seqjax.train.optimizer import make_optimizer

from common import RECURRENT_ROWS, environment, load_average, matmul_peak
from row_runner import (
    Run,
    Step,
    compile_timed,
    device_limit_bytes,
    fmt_bytes,
    one_line,
    print_profiles,
    print_table,
)

GROUPS = ("bert", "translation", "lstm", "attention", "linear", "memory")

flags.DEFINE_bool("quick", False, "Tiny shapes (seconds on a CPU): a smoke test of every row.")
flags.DEFINE_string("out", "accelerator.json", "Where to write the JSON of every row.")
flags.DEFINE_list("rows", list(GROUPS), f"Row groups to run, some of {', '.join(GROUPS)}.")
flags.DEFINE_integer("steps", 7, "Most timed steps per row (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Warm-up steps per row after compiling (1 for a row whose "
                     "first step takes over --row_seconds).")
flags.DEFINE_float("row_seconds", 4.0, "A row's timed steps are cut to about this many seconds "
                   "(at least one step).")
flags.DEFINE_float("max_step_seconds", 5.0, "linear: a row whose step took longer than this is "
                   "not run at the longer lengths.")
flags.DEFINE_integer("compile_threads", 0, "Rows of a group compiled at once before any is "
                     "timed; 0: 1 on a CPU (its cores would slow each other's compiles), 8 on "
                     "an accelerator's host.")
flags.DEFINE_integer("peak_size", 0, "P of the bfloat16 P x P matmul that measures the peak; "
                     "0: 8192 on an accelerator, 1024 on a CPU, 256 with --quick.")
flags.DEFINE_list("profile", [], "More rows to trace after timing them, by parts of their "
                  "names: where the step spends its time, by JAX op. The BERT rows at the first "
                  "sequence length without remat (the MFU target's) always are.")
FLAGS = flags.FLAGS

# --quick compiles with less LLVM optimisation, which halves XLA:CPU's compile time, most of a
# smoke test's; it checks that every row runs, not how fast.
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# By default XLA:CPU orders a program's ops for concurrency (breadth first), not for memory: the
# memory group's compiled temp is then the same, to the KiB, for every remat mode. The group
# asks for its depth-first memory scheduler instead, as an accelerator's compiler schedules
# with memory in mind. The flag is XLA:CPU's alone.
MEMORY_XLA_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bfloat16 peak FLOP/s by datasheet, matched against jax.devices()[0].device_kind in
# order (the first pattern found in it wins); a chip not listed gets None.
DATASHEET_BF16 = (
    ("H100 PCIe", 756e12),
    ("NVL", None),  # H100 NVL and H200 NVL: other clocks and power, not the SXM figure
    ("H100", 989e12),  # SXM
    ("H200", 989e12),  # SXM: the H100's processor with more memory
    ("A100", 312e12),
)


def datasheet_peak(device_kind: str):
    return next((peak for pattern, peak in DATASHEET_BF16 if pattern in device_kind), None)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


# ----------------------------------------------------------------------------- training steps

def train_step(loss_fn, params, tx, batch) -> Step:
    """The jitted training step of `loss_fn(params, batch, rng) -> scalar`: value_and_grad, the
    optimiser's update, with the (params, optimiser state, step) state donated. With abstract
    `params` (jax.ShapeDtypeStructs) it is compiled only, and the Step cannot run."""
    make_state = lambda params: (params, tx.init(params), jnp.zeros((), jnp.int32))
    abstract = isinstance(jax.tree_util.tree_leaves(params)[0], jax.ShapeDtypeStruct)
    state = jax.eval_shape(make_state, params) if abstract else make_state(params)
    key = jax.random.PRNGKey(1)

    def step(state, batch):
        params, opt_state, i = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, jax.random.fold_in(key, i))
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, i + 1), loss

    compiled, lower_s, xla_s = compile_timed(step, state, batch, donate_argnums=0)
    return Step(compiled, (state, batch), True, lower_s, xla_s)


def grad_step(fn, params, *inputs) -> Step:
    """value_and_grad of mean(fn(params, *inputs)**2) w.r.t. params and inputs, jitted: the
    recurrent benchmarks' training step (no optimiser)."""
    def loss(params, *inputs):
        return jnp.mean(jnp.square(fn(params, *inputs).astype(jnp.float32)))

    argnums = tuple(range(1 + len(inputs)))
    args = (params, *inputs)
    compiled, lower_s, xla_s = compile_timed(jax.value_and_grad(loss, argnums=argnums), *args)
    return Step(compiled, args, False, lower_s, xla_s)


def matrix_params(params) -> int:
    """The entries of the parameter arrays of two or more dimensions (the products' weights)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params) if x.ndim >= 2)


# ----------------------------------------------------------------------------- bert

BERT_VOCAB = 30522


def bert_config(size: str, L: int, **model):
    config = load_experiment(os.path.join(ROOT, "experiments", "bert_pretrain.py")).get_config(
        f"size={size}")
    config.model.update(model)
    config.data.update(max_seq_len=L, max_predictions=math.ceil(0.15 * L))
    return config


def bert_batch(B: int, L: int, V: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    first = len(pretraining_data.SPECIAL_TOKENS)
    tokens = rng.integers(first, V, (B, L))
    tokens[:, 0] = pretraining_data.CLS_ID
    tokens[:, [L // 2, L - 1]] = pretraining_data.SEP_ID
    return dict(tokens=jnp.asarray(tokens, jnp.int32),
                segments=jnp.asarray((np.arange(L)[None, :] > L // 2).repeat(B, 0), jnp.int32),
                valid_len=jnp.full((B,), L, jnp.int32),
                nsp_label=jnp.asarray(rng.integers(0, 2, (B,)), jnp.int32))


def bert_model(config, V: int) -> BertPretraining:
    return BertPretraining(bert_task.make_encoder(config, V), nsp=config.data.nsp)


def bert_params(config, V: int, init=None):
    """The model's parameters (`init=jax.eval_shape`: their shapes only). They do not depend on
    remat, the attention implementation or the sequence length, so the rows of a model size
    share one draw, copied for each (the training step consumes its state)."""
    P = config.data.max_predictions
    tokens = jnp.zeros((1, config.data.max_seq_len), jnp.int32)
    init = init or (lambda f, *args: jax.jit(f)(*args))
    return init(bert_model(config, V).init, jax.random.PRNGKey(0), tokens, tokens, tokens == 0,
                tokens[:, :P])


def bert_step(config, B: int, V: int, params=None, compile_only: bool = False) -> Step:
    """seqjax.tasks.bert's pretraining step at batch B: its encoder, loss and optimiser, from
    a copy of `params` (default: drawn here)."""
    d = config.data
    L, P = d.max_seq_len, d.max_predictions
    model = bert_model(config, V)
    draw_mask = functools.partial(
        masking.mask_tokens, vocab_size=V, mask_id=pretraining_data.MASK_ID,
        special_ids=tuple(range(len(pretraining_data.SPECIAL_TOKENS))), mask_prob=d.mask_prob,
        mask_token_prob=d.mask_token_prob, random_token_prob=d.random_token_prob,
        max_predictions=P)

    def loss_fn(params, batch, rng):
        sums, _ = bert_task.pretraining_loss(model, params, batch, rng=rng, train=True,
                                             draw_mask=draw_mask, max_predictions=P)
        return sums["loss"] / sums["weight"]

    if compile_only:
        params = bert_params(config, V, jax.eval_shape)
    elif params is None:
        params = bert_params(config, V)
    else:
        params = jax.tree_util.tree_map(jnp.copy, params)
    return train_step(loss_fn, params, make_optimizer(config.opt, config.num_train_steps),
                      bert_batch(B, L, V))


def bert_flops(config, B: int, V: int) -> float:
    m, d = config.model, config.data
    E, F, layers, L, P = m.d_model, m.ffn_hiddens, m.num_layers, d.max_seq_len, d.max_predictions
    dense = layers * (4 * E * E + 2 * E * F) * B * L + (E * E + E * V) * B * P
    dense += (E * E + 2 * E) * B if d.nsp else 0
    return 6.0 * dense + 12.0 * layers * L * E * B * L


def run_bert(run: Run, quick: bool):
    size, V, seqs, tokens, remats = (("tiny", 1000, [32], 128, ["none"]) if quick else
                                     ("base", BERT_VOCAB, [128, 512], 32768, ["none", "block"]))
    shape = dict(num_layers=1, max_position=64) if quick else {}
    reference = bert_config(size, seqs[0], dtype="bfloat16", param_dtype="float32", **shape)
    params = bert_params(reference, V)
    for L in seqs:
        B = tokens // L
        for remat in remats:
            for impl in ("xla", "cudnn"):
                name = f"BERT-{size} MLM L={L} B={B} remat={remat} attention={impl}"
                if impl == "cudnn" and not on_gpu():
                    run.skip("bert", name, "n/a", "GPU only")
                    continue
                config = bert_config(size, L, dtype="bfloat16", param_dtype="float32",
                                     remat=remat, attention_impl=impl, attention_dropout=0.0,
                                     **shape)
                run.measure("bert", name, lambda c=config, B=B: bert_step(c, B, V, params),
                            tokens=B * L, flops=bert_flops(config, B, V),
                            profile=L == seqs[0] and remat == "none")


# ----------------------------------------------------------------------------- translation

def run_translation(run: Run, quick: bool):
    config = load_experiment(os.path.join(ROOT, "experiments", "translate.py")).get_config()
    if quick:
        shape = dict(num_layers=1, d_model=32, num_heads=2, ffn_hiddens=64)
        L, B, V = 16, 8, 200
    else:
        shape = dict(num_layers=6, d_model=512, num_heads=8, ffn_hiddens=2048)
        L, B, V = 128, 256, config.data.vocab_size
    config.model.update(shape, dtype="bfloat16", param_dtype="float32")
    config.data.num_steps = L
    model = translation_task.make_model(config, V, V)
    rng = np.random.default_rng(0)
    ids = lambda: jnp.asarray(rng.integers(4, V, (B, L)), jnp.int32)
    batch = dict(src=ids(), src_valid_len=jnp.full((B,), L, jnp.int32), tgt_in=ids(),
                 tgt_out=ids(), weights=jnp.ones((B, L), jnp.float32))

    def build():
        def loss_fn(params, batch, rng):
            sums, _ = translation_task.loss(model, params, batch, rng=rng, train=True)
            return sums["loss"] / sums["weight"]

        tokens = jnp.zeros((1, L), jnp.int32)
        params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens, jnp.ones((1,), jnp.int32),
                                     tokens)
        return train_step(loss_fn, params, make_optimizer(config.opt, config.num_train_steps),
                          batch)

    m = config.model
    E, F, n = m.d_model, m.ffn_hiddens, m.num_layers
    # source and target both L tokens: encoder layer, decoder layer (self, cross, FFN), head
    dense = n * (4 * E * E + 2 * E * F) + n * (8 * E * E + 2 * E * F) + E * V
    flops = 6.0 * dense * B * L + 12.0 * (n + 2 * n) * L * E * B * L
    run.measure("translation", f"Transformer {n}+{n} layers d={E} L={L} B={B} "
                f"attention={m.attention_impl}", build, tokens=B * L, flops=flops)


# ----------------------------------------------------------------------------- lstm

class FlaxLSTM(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x_BxTxF):
        return nn.RNN(nn.OptimizedLSTMCell(self.features))(x_BxTxF)


def recurrent_step(module, x) -> Step:
    """grad_step of a recurrent module's outputs (the second of (carries, outputs) for seqjax's
    layers, which return both)."""
    params = jax.jit(module.init)(jax.random.PRNGKey(0), x)

    def outputs(params, x):
        out = module.apply(params, x)
        return out[1] if isinstance(out, tuple) else out

    return grad_step(outputs, params, x)


def cudnn_lstm_step(x, H: int) -> Step:
    from jax.experimental import rnn

    B, _, F = x.shape
    weights = rnn.init_lstm_weight(jax.random.PRNGKey(0), F, H, 1, False)
    h0 = c0 = jnp.zeros((1, B, H), jnp.float32)
    lengths = jnp.full((B,), x.shape[1], jnp.int32)

    def apply(weights, x):
        return rnn.lstm(x, h0, c0, weights, lengths, input_size=F, hidden_size=H, num_layers=1,
                        dropout=0.0, bidirectional=False)[0]

    return grad_step(apply, weights, x)


def run_lstm(run: Run, quick: bool):
    H, T, B = (32, 16, 4) if quick else (1024, 128, 64)
    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, H), jnp.float32)
    flops = 6.0 * 4 * H * (H + H) * B * T
    tag = f"H={H} T={T} B={B}"
    run.measure("lstm", f"seqjax StackedRecurrent {tag}",
                lambda: recurrent_step(StackedRecurrent("lstm", H, num_layers=1), x),
                tokens=B * T, flops=flops)
    run.measure("lstm", f"flax nn.RNN(OptimizedLSTMCell) {tag}",
                lambda: recurrent_step(FlaxLSTM(H), x), tokens=B * T, flops=flops)
    name = f"cuDNN jax.experimental.rnn.lstm {tag}"
    if on_gpu():
        run.measure("lstm", name, lambda: cudnn_lstm_step(x, H), tokens=B * T, flops=flops)
    else:
        run.skip("lstm", name, "n/a", "GPU only")


# ----------------------------------------------------------------------------- attention

def causal_pairs(N: int) -> int:
    return N * (N + 1) // 2


def window_pairs(N: int, W: int) -> int:
    """Query-key pairs of causal attention to at most W keys (the query's and the W-1 before)."""
    return sum(min(i + 1, W) for i in range(N)) if N <= W else W * (W + 1) // 2 + (N - W) * W


def local_pairs(N: int, S: int, look_back: int) -> int:
    """Pairs of causal block-local attention: offset o of a block sees o + 1 keys of its own
    block and all of the (at most look_back) blocks before it."""
    C = N // S
    return C * S * (S + 1) // 2 + sum(min(c, look_back) * S * S for c in range(C))


def causal_mask(N: int):
    """[N, N], True where query i may see key j <= i; built inside the traced function, so
    that it is computed on the device rather than embedded in the program as a constant."""
    return jnp.arange(N)[None, :] <= jnp.arange(N)[:, None]


def attention_step(fn, B, N, H, D) -> Step:
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, ct = (jax.random.normal(key, (B, N, H, D), jnp.bfloat16) for key in keys)

    def loss(q, k, v, ct):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))

    args = (q, k, v, ct)
    compiled, lower_s, xla_s = compile_timed(jax.grad(loss, argnums=(0, 1, 2)), *args)
    return Step(compiled, args, False, lower_s, xla_s)


def run_attention(run: Run, quick: bool):
    B, H, D = 1, 8, 64
    lengths, S = ([128, 512], 64) if quick else ([4096, 16384, 65536], 256)
    W = S  # the sliding window: the query and the W - 1 keys before it
    limit = device_limit_bytes()
    for N in lengths:
        flops = lambda pairs: 3.0 * 4 * B * H * D * pairs
        rows = [
            (f"seqjax dot_product_attention N={N}", "full",
             lambda q, k, v: dot_product_attention(q, k, v, mask=causal_mask(q.shape[1])),
             causal_pairs(N)),
            (f"cuDNN flash attention N={N}", "cudnn",
             lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                          implementation="cudnn"),
             causal_pairs(N)),
            (f"cuDNN sliding window ({W - 1}, 0) N={N}", "cudnn",
             lambda q, k, v: jax.nn.dot_product_attention(
                 q, k, v, is_causal=True, local_window_size=(W - 1, 0), implementation="cudnn"),
             window_pairs(N, W)),
            (f"seqjax local_attention S={S} look_back=1 N={N}", "local",
             lambda q, k, v: local_attention(q, k, v, block_size=S, look_back=1, causal=True),
             local_pairs(N, S, 1)),
        ]
        for name, kind, fn, pairs in rows:
            if kind == "cudnn" and not on_gpu():
                run.skip("attention", name, "n/a", "GPU only")
                continue
            scores = 4 * B * H * N * N  # float32 [B, H, N, N]
            if kind == "full" and limit and 2 * scores > limit:
                run.skip("attention", name, "OOM", f"skipped: its float32 [{B}, {H}, {N}, {N}] "
                         f"scores alone are {fmt_bytes(scores)} (device: {fmt_bytes(limit)})",
                         tokens=B * N, estimated_bytes=scores)
                continue
            run.measure("attention", name, lambda fn=fn, N=N: attention_step(fn, B, N, H, D),
                        tokens=B * N, flops=flops(pairs))


# ----------------------------------------------------------------------------- linear

LINEAR_ROWS = ("lstm (sequential)", "mingru associative", "mingru sequential", "lru associative",
               "lru sequential")


def run_linear(run: Run, quick: bool):
    """linear_recurrent.py's sweep over T on its rows (common.RECURRENT_ROWS): fixed tokens per
    batch, so only the recurrence's length moves."""
    H, tokens, lengths = (32, 256, [64]) if quick else (1024, 65536, [512, 4096, 16384])
    slow = {}
    for T in lengths:
        B = max(1, tokens // T)
        x = jax.random.normal(jax.random.PRNGKey(1), (B, T, H), jnp.float32)
        for row in LINEAR_ROWS:
            make = RECURRENT_ROWS[row]
            name = f"{row} H={H} T={T} B={B}"
            if row in slow:
                run.skip("linear", name, "skipped", slow[row], tokens=B * T)
                continue
            params = jax.eval_shape(make(H).init, jax.random.PRNGKey(0), x)
            run.measure("linear", name, lambda make=make, x=x: recurrent_step(make(H), x),
                        tokens=B * T, flops=6.0 * matrix_params(params) * B * T, row=row)
        for record in run.flush():
            if record.get("step_s", 0) > FLAGS.max_step_seconds:
                slow[record["row"]] = (f"a step took {record['step_s']:.2f} s at T={T} "
                                       f"(> --max_step_seconds={FLAGS.max_step_seconds:g})")


# ----------------------------------------------------------------------------- memory

MEMORY_TARGET = 0.40  # remat 'block' temp / remat 'none' temp, at most


def run_memory(run: Run, quick: bool):
    """Compile only: the temp bytes of BERT-Small MLM training steps at L=512, batch 8 (--quick:
    BERT-Tiny at L=128, batch 4)."""
    size, L, B = ("tiny", 128, 4) if quick else ("small", 512, 8)
    for remat in ("none", "block", "full"):
        config = bert_config(size, L, remat=remat)
        V = config.data.vocab_size
        name = f"BERT-{size} MLM L={L} B={B} remat={remat} ({config.model.dtype}), compile only"
        run.measure("memory", name, lambda c=config, V=V: bert_step(c, B, V, compile_only=True),
                    tokens=B * L, compile_only=True, remat=remat)
    records = run.flush()
    temps = {r["remat"]: r.get("temp_bytes") for r in records}
    for r in records:
        if temps.get("none") and temps.get(r["remat"]) is not None:
            r["temp_ratio_to_none"] = temps[r["remat"]] / temps["none"]
            r["note"] = f"temp {r['temp_ratio_to_none']:.3f} of remat=none's"
    ratios = {r: temps[r] / temps["none"] for r in ("block", "full")
              if temps.get("none") and temps.get(r) is not None}
    return dict(shape=f"BERT-{size} L={L} B={B}", temp_bytes=temps, ratios=ratios,
                target=MEMORY_TARGET,
                met=ratios["block"] <= MEMORY_TARGET if "block" in ratios else None)


# ----------------------------------------------------------------------------- main

RUNNERS = dict(bert=run_bert, translation=run_translation, lstm=run_lstm,
               attention=run_attention, linear=run_linear, memory=run_memory)


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.rows) - set(GROUPS))
    if unknown:
        raise app.UsageError(f"unknown row groups {unknown}; expected some of {list(GROUPS)}")
    start = time.perf_counter()
    extra_flags = [QUICK_XLA_FLAGS] * FLAGS.quick + [MEMORY_XLA_FLAGS] * ("memory" in FLAGS.rows)
    if extra_flags:  # read when the backend starts, which environment() below does
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *extra_flags]).strip()
    banner = environment((jax, flax, optax), [load_average()])
    print(banner, flush=True)
    device_kind = jax.devices()[0].device_kind
    P = FLAGS.peak_size or (256 if FLAGS.quick else 1024 if jax.default_backend() == "cpu"
                            else 8192)
    measured = matmul_peak(P, jnp.bfloat16, calls=10)
    datasheet = datasheet_peak(device_kind)
    print(f"device_kind {device_kind!r}; bf16 peak: measured {measured / 1e12:,.2f} TFLOP/s "
          f"([{P}, {P}] @ [{P}, {P}], best of 3 rounds of 10), datasheet "
          f"{'unknown' if datasheet is None else f'{datasheet / 1e12:,.0f} TFLOP/s'}; "
          f"{'quick shapes' if FLAGS.quick else 'full shapes'}", flush=True)
    run = Run(FLAGS.out, dict(environment=banner, device_kind=device_kind,
                              backend=jax.default_backend(), quick=FLAGS.quick,
                              peak_matmul_size=P, peak_measured_flops=measured,
                              peak_datasheet_flops=datasheet),
              FLAGS.compile_threads or (1 if jax.default_backend() == "cpu" else 8),
              FLAGS.warmup, FLAGS.steps, FLAGS.row_seconds,
              profile=FLAGS.profile)
    for group in dict.fromkeys(FLAGS.rows):  # in the order given, each once
        print(f"[{group}] starting", flush=True)
        group_start = time.perf_counter()
        try:
            extra = RUNNERS[group](run, FLAGS.quick) or {}
        except Exception as error:  # a group's setup failing (not one row) still ends in a line
            traceback.print_exc(limit=3)
            run.skip(group, f"{group} (setup)", "failed", one_line(error))
            extra = {}
        run.flush()
        run.group_done(group, time.perf_counter() - group_start, **extra)

    print_table(run)
    print_profiles(run)
    memory = run.groups.get("memory", {})
    if memory.get("ratios"):
        temps = memory["temp_bytes"]
        print(f"\nmemory: {memory['shape']} compiled temp: none {fmt_bytes(temps['none'])}, "
              + ", ".join(f"{r} {fmt_bytes(temps[r])} ({memory['ratios'][r]:.3f} of none)"
                          for r in memory["ratios"])
              + f"; target block <= {MEMORY_TARGET:.0%} of none: "
              + ("met" if memory["met"] else "NOT met"))
    print("\nelapsed per group: " + ", ".join(
        f"{g} {v['elapsed_s']:.1f} s" for g, v in run.groups.items() if v.get("elapsed_s")))
    run.info["total_s"] = time.perf_counter() - start
    run.write()
    print(f"total {run.info['total_s']:.1f} s; wrote {FLAGS.out}", flush=True)


if __name__ == "__main__":
    app.run(main)
