r"""Training-step throughput of seqjax's linear recurrent layers against its LSTM, by length.

    python benchmarks/linear_recurrent.py              # the full sweep (long on 2 CPU cores:
                                                       # the LSTM's steps run one after another)
    python benchmarks/linear_recurrent.py --quick      # T = 32, 128 at 1024 tokens, a smoke
                                                       # test (about a minute, mostly compiling)
    python benchmarks/linear_recurrent.py --plot=linear_recurrent.png
    python benchmarks/linear_recurrent.py --rows="lstm (sequential),mingru associative" \
        --seq_lens=512,4096 --hidden=128

The tokens per batch are fixed (--tokens = batch * T, the batch at least 1), so every size
does the same arithmetic and only the length of the recurrence changes: a layer whose
recurrence is a parallel prefix scan (O(log T) depth) should keep its tokens/s as T grows,
while a sequential one (T dependent steps, each on a smaller batch) loses it. One training
step is jitted value_and_grad of mean(outputs**2) with respect to the parameters and the
inputs, as in recurrent.py; tokens/s = batch * T / (median seconds per step).

Rows, each one layer of width H (input width H too): "lstm (sequential)" is seqjax
`StackedRecurrent('lstm', H, num_layers=1)`, the bare textbook LSTM; the others are
`LinearRecurrentStack(cell, H, num_layers=1, method=...)`, the papers' block: an input Dense,
LayerNorm, the linear layer, a GLU and a final LayerNorm. Compared are the layers as one would
use them, not the recurrences alone; forward matmul work per token is of the same order
(LSTM 8 H^2 multiply-adds; minGRU block 5, minLSTM 6, LRU about 9 H^2 with its complex C).

"x LSTM" = this row's tokens/s / the LSTM's, the median over rounds of the per-round ratio
(the rows of one size run in turn, round after round, so that load changes on a shared
machine hit all rows alike; the ratios are the result, not the absolute numbers). "flatness"
= us/token at the largest T a row was timed at / us/token at T=512: near 1 is flat.
A row whose first step at a size (after compiling) takes over --max_seconds_per_step is timed
there but skipped at larger sizes (marked in the table), so the sweep does not hang on it.
"""

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from seqjax.plotting import pyplot

from common import (
    LSTM_ROW,
    RECURRENT_ROWS,
    block,
    environment,
    interleaved_times,
    load_average,
    paired_median,
    timed,
)

flags.DEFINE_integer("tokens", 16384, "Tokens per batch, batch * T; the batch is "
                     "max(1, tokens // T).")
flags.DEFINE_list("seq_lens", ["128", "512", "2048", "4096", "16384"], "Sequence lengths T.")
flags.DEFINE_integer("hidden", 256, "Hidden size H (the input width is H too).")
flags.DEFINE_integer("repeats", 5, "Timed rounds; each runs every row of a size once.")
flags.DEFINE_list("rows", [], "Rows to run (names as in the table); default: all.")
flags.DEFINE_float("max_seconds_per_step", 20.0, "A row whose first step at a size (not "
                   "counting its compile) takes longer than this is skipped at the larger sizes.")
flags.DEFINE_bool("quick", False, "T = 32, 128 at --tokens=1024 and 2 repeats, a smoke test.")
flags.DEFINE_string("plot", "", "If set, write a log-log PNG of tokens/s against T here.")
FLAGS = flags.FLAGS

FLATNESS_T = 512  # the short length that "flatness" divides by


def jax_step(module, x_BxTxF):
    """recurrent.py's step (not imported: that would define its flags twice) for a module
    that returns (carries, outputs): the compiled value_and_grad of mean(outputs**2) w.r.t.
    (params, inputs), and its arguments."""
    params = module.init(jax.random.PRNGKey(0), x_BxTxF)

    def loss(params, x):
        return jnp.mean(jnp.square(module.apply(params, x)[1]))

    args = (params, x_BxTxF)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile(), args


def measure(T, B, H, names, repeats):
    """({row: step times in round order}, {row: (compile seconds, first run seconds)}) at one
    size; the rows run interleaved."""
    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, H), jnp.float32)
    steps, first = {}, {}
    for name in names:
        start = time.perf_counter()
        compiled, args = jax_step(RECURRENT_ROWS[name](H), x)
        steps[name] = block(compiled, *args)
        compile_seconds = time.perf_counter() - start
        first[name] = (compile_seconds, timed(steps[name]))
    # The first run above was one warm-up round; one more, as recurrent.py's two.
    return interleaved_times(steps, repeats, warmup=1), first


def plot(path, results, seq_lens, names):
    """Log-log tokens/s against T, one line per row (sizes a row skipped are left out)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        points = [(T, results[T][name]["tokens_per_s"]) for T in seq_lens
                  if "tokens_per_s" in results[T].get(name, {})]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (tokens per batch fixed)")
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"1-layer training step, H={FLAGS.hidden}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    if FLAGS.quick:
        seq_lens, tokens, repeats = [32, 128], 1024, 2
    else:
        seq_lens, tokens, repeats = [int(t) for t in FLAGS.seq_lens], FLAGS.tokens, FLAGS.repeats
    names = FLAGS.rows or list(RECURRENT_ROWS)
    unknown = [n for n in names if n not in RECURRENT_ROWS]
    if unknown:
        raise app.UsageError(f"unknown rows {unknown}; expected some of {list(RECURRENT_ROWS)}")
    H = FLAGS.hidden
    seq_lens = sorted(seq_lens)  # skipping a slow row only makes sense going up in T

    print(environment(extras=[load_average()]))
    print(f"float32; H={H} (input width H); {tokens} tokens per batch, batch = max(1, tokens "
          f"// T); training step = value_and_grad of mean(outputs**2) w.r.t. params and "
          f"inputs, jitted; the rows of a size run in turn for {repeats} rounds after 2 warm-up "
          f"rounds; ms/step is the median, tokens/s = batch*T / that.")
    print("x LSTM = this row's tokens/s / the LSTM's, the median over rounds of the per-round "
          "ratio; above 1: faster than the LSTM.\n")
    print("| T | batch | row | ms/step | tokens/s | x LSTM | us/token |")
    print("| --- | --- | --- | --- | --- | --- | --- |")

    results = {}  # T -> row -> {"tokens_per_s", "us_per_token"} or {"skipped"}
    skipped = {}  # row -> why it is no longer run
    for T in seq_lens:
        B = max(1, tokens // T)
        active = [n for n in names if n not in skipped]
        times, first = measure(T, B, H, active, repeats) if active else ({}, {})
        results[T] = {}
        for name in names:
            if name in skipped:
                results[T][name] = {"skipped": skipped[name]}
                print(f"| {T} | {B} | {name} | {skipped[name]} | - | - | - |", flush=True)
                continue
            seconds = statistics.median(times[name])
            got = results[T][name] = {"tokens_per_s": B * T / seconds,
                                      "us_per_token": 1e6 * seconds / (B * T)}
            # same tokens per step, so a tokens/s ratio is the inverse time ratio
            ratio = paired_median(times[LSTM_ROW], times[name]) if LSTM_ROW in times else None
            print(f"| {T} | {B} | {name} | {1e3 * seconds:,.2f} | {got['tokens_per_s']:,.0f} | "
                  f"{'-' if ratio is None else f'{ratio:.2f}'} | {got['us_per_token']:.3f} |",
                  flush=True)
        # Judged on the run, not the compile: compiling can take seconds at any size, and
        # skipping a parallel row for that would hide exactly the long-T result.
        for name, (compile_seconds, seconds) in first.items():
            if seconds > FLAGS.max_seconds_per_step:
                skipped[name] = (f"skipped: a step took {seconds:.3g} s at T={T} "
                                 f"(> {FLAGS.max_seconds_per_step:g}; compiling "
                                 f"{compile_seconds:.0f} s)")

    print(f"\nFlatness: us/token at the largest T timed / us/token at T={FLATNESS_T} "
          f"(1 = flat; above 1 = slower per token on longer sequences):")
    if FLATNESS_T not in seq_lens:
        print(f"  skipped: T={FLATNESS_T} is not in the sweep")
    for name in names if FLATNESS_T in seq_lens else []:
        timed_at = [T for T in seq_lens if "us_per_token" in results[T][name]]
        if FLATNESS_T not in timed_at:
            print(f"  {name}: not timed at T={FLATNESS_T}")
            continue
        T_max = timed_at[-1]
        flatness = results[T_max][name]["us_per_token"] / results[FLATNESS_T][name]["us_per_token"]
        print(f"  {name}: {flatness:.2f} (T={T_max} vs {FLATNESS_T})")

    if FLAGS.plot:
        plot(FLAGS.plot, results, seq_lens, names)
        print(f"\nWrote {FLAGS.plot}")


if __name__ == "__main__":
    app.run(main)
