r"""Time and compiled peak memory of seqjax's block-local attention against full attention.

    python benchmarks/attention.py              # the full table: about 7 minutes on 2 CPU cores
    python benchmarks/attention.py --quick      # tiny sizes, a smoke test (under a minute)
    python benchmarks/attention.py --lengths=4096,16384 --block_sizes=256 --look_backs=0,1
    python benchmarks/attention.py --nobreakdown --repeats=9

Rows, at each length N (self-attention, q, k, v of shape [B, N, H, D], float32, causal unless
--nocausal): seqjax `dot_product_attention` (full, with a causal [N, N] mask; the reference
row), `jax.nn.dot_product_attention` (implementation='xla', is_causal) with and without
`local_window_size` (whose XLA path still builds the [N, N] scores and mask), Flax's
`flax.linen.dot_product_attention` (the core of `nn.MultiHeadDotProductAttention`) with the
same mask, and seqjax `local_attention` for every --block_sizes S and --look_backs.

Columns: the median seconds of one call of the forward (jitted, outputs ready) and of the
forward plus backward (jax.grad of sum(out * a fixed random cotangent) w.r.t. q, k and v);
the compiled peak memory of each, from XLA's memory analysis (argument + output + temp -
alias bytes: temp is the buffer the executable allocates for its intermediates); "speed-up"
= seqjax full attention's time / this row's time (for a local row: the speed-up of local over
full attention at the same N), the median over rounds of the per-round ratio; "memory /"
= full attention's peak / this row's peak; and "% peak" = useful FLOPs / time as a fraction
of this machine's float32 matmul peak, measured in the same run (a jitted P x P @ P x P
matmul, P = --peak_size, best of 3, before the table; measured again after it, and the
summary uses the higher). Useful FLOPs: 4 B H N N D for full attention, 4 B H N W D for
local attention with W = (1 + look_back) S keys per query (nothing halved for causal
masking), 3x that forward plus backward.

What does not fit is skipped and says so: a function runs only if its compiled memory
analysis needs at most --memory_fraction of the memory available (MemAvailable in
/proc/meminfo, plus what this process holds above its starting size; the default 0.5 leaves
room for what the runtime holds beyond the analysis), else 'skipped: needs X GiB'; a forward
plus backward runs only if about 3x the forward's time is at most --max_seconds, and a
forward only if its time extrapolated from the previous length (x (N'/N)^2 for full
attention, x N'/N for local) is at most 4 --max_seconds.

Timing: every function is compiled ahead of time and run once (a warm-up); then the rows of a
length run in turn, round after round, so that a change of load on a shared machine hits
all rows alike. A row gets min(--repeats, --row_seconds / its warm-up time) rounds, at least
one; a row slower than --row_seconds (full attention at 16k) is timed by its warm-up run
alone. Ratios pair the rows' samples in round order. The ratios are the result, not the
absolute numbers.

After the table, a summary checks the targets of the issue on CPU (at N=16384, S=256, or in
--quick at the largest length and block size): local attention (look_back 0) at least 50x
faster forward and at least 20x less memory than full attention; doubling N at most 2.2x
the time of local attention; look_back=1 at most 1.7x the time of look_back=0; N=65536
forward and forward plus backward within 2 GB; and local attention's forward plus backward
reaching at least 40% of the matmul peak. Then --breakdown profiles `local_attention`'s
forward and forward plus backward at that size: the time and FLOP rate of each matmul, and
the time of the other ops inside and outside its scan over blocks.
"""

import dataclasses
import math
import os
import statistics
import time
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from seqjax.nn.attention import dot_product_attention, local_attention

from common import (
    PEAK_SIZE,
    available_bytes,
    block,
    compiled_bytes,
    environment,
    load_average,
    matmul_peak,
    op_parts,
    op_profile,
    paired_median,
    timed,
    verdict,
)

flags.DEFINE_list("lengths", ["1024", "4096", "16384", "65536"], "Sequence lengths N.")
flags.DEFINE_list("block_sizes", ["128", "256"], "Block sizes S of local attention.")
flags.DEFINE_list("look_backs", ["0", "1"], "look_back values of local attention.")
flags.DEFINE_integer("repeats", 5, "Most timed rounds at a length (slow rows get fewer).")
flags.DEFINE_integer("d_model", 256, "Model width E = heads * head_dim.")
flags.DEFINE_integer("heads", 4, "Attention heads H (head_dim D = d_model / heads).")
flags.DEFINE_integer("batch", 1, "Batch size B.")
flags.DEFINE_bool("causal", True, "Causal attention (every row); --nocausal: bidirectional.")
flags.DEFINE_float("row_seconds", 8.0, "Timing budget of one row at one length: it gets "
                   "min(--repeats, row_seconds / one call) rounds, at least 1.")
flags.DEFINE_float("max_seconds", 30.0, "Skip a forward+backward whose estimated time per call "
                   "(3x the forward's) is above this, and a forward whose time extrapolated "
                   "from the previous length is above 4x this.")
flags.DEFINE_float("memory_fraction", 0.5, "Run a function only if its compiled peak memory is "
                   "at most this fraction of the memory available (a call's resident memory "
                   "can peak well above XLA's analysis).")
flags.DEFINE_integer("peak_size", PEAK_SIZE, "P of the P x P @ P x P float32 matmul that measures "
                     "the machine's peak FLOP rate.")
flags.DEFINE_bool("breakdown", True, "After the summary, profile local attention's forward "
                  "and forward+backward at the target size, by kind of op.")
flags.DEFINE_bool("quick", False, "Tiny sizes and 2 repeats, a smoke test.")
FLAGS = flags.FLAGS

FULL = "seqjax dot_product_attention"  # the reference row
FWD, GRAD = "fwd", "fwd+bwd"
GB = 10 ** 9


# ----------------------------------------------------------------------------- rows

@dataclasses.dataclass
class Row:
    name: str
    fn: Callable  # (q, k, v) -> out, all [B, N, H, D]
    flops: float  # useful FLOPs of the forward
    kind: str  # "full" or "local"
    block_size: Optional[int] = None
    look_back: Optional[int] = None


def causal_mask(n):
    return jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]


def make_rows(N, B, H, D, block_sizes, look_backs, causal):
    full_flops = 4.0 * B * H * N * N * D
    S_win = max(block_sizes)
    window = (S_win - 1, 0) if causal else (S_win // 2, S_win // 2)
    mask = (lambda: causal_mask(N)) if causal else (lambda: None)
    flax_mask = (lambda: causal_mask(N)[None, None]) if causal else (lambda: None)
    rows = [
        Row(FULL, lambda q, k, v: dot_product_attention(q, k, v, mask=mask()),
            full_flops, "full"),
        Row("jax.nn.dot_product_attention",
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                         implementation="xla"),
            full_flops, "full"),
        Row(f"jax.nn.dot_product_attention local_window_size={window}",
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=causal, local_window_size=window, implementation="xla"),
            full_flops, "full"),
        Row("flax.linen.dot_product_attention",
            lambda q, k, v: nn.dot_product_attention(q, k, v, mask=flax_mask(),
                                                     deterministic=True),
            full_flops, "full"),
    ]
    for S in block_sizes:
        for lb in look_backs:
            rows.append(Row(
                f"seqjax local_attention S={S} look_back={lb}",
                lambda q, k, v, S=S, lb=lb: local_attention(q, k, v, block_size=S,
                                                            causal=causal, look_back=lb),
                4.0 * B * H * N * (1 + lb) * S * D, "local", S, lb))
    return rows


def with_grad(fn):
    """(q, k, v, ct) -> the gradients of sum(fn(q, k, v) * ct) w.r.t. q, k and v."""
    def grads(q, k, v, ct):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct), argnums=(0, 1, 2))(q, k, v)
    return grads


# ----------------------------------------------------------------------------- measuring

def own_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


BASE_RSS = own_rss_bytes()


def memory_budget() -> float:
    """--memory_fraction of what this process could use now: the memory available, plus what
    it holds above its size at import (freed buffers it may keep and reuse)."""
    return FLAGS.memory_fraction * (available_bytes() + max(0, own_rss_bytes() - BASE_RSS))


def fmt_bytes(n) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclasses.dataclass
class Result:
    nbytes: int  # compiled peak memory
    samples: list = dataclasses.field(default_factory=list)  # seconds, in round order
    skipped: Optional[str] = None

    @property
    def seconds(self):
        return statistics.median(self.samples) if self.samples else None


def paired_ratio(num: Result, den: Result):
    """median over rounds of num's time / den's time, pairing samples in round order; None
    when either was not timed."""
    return paired_median(num.samples, den.samples)


def measure_length(N, rows, B, H, D, previous):
    """{(row name, FWD or GRAD): Result} at length N. `previous` maps row name to (length,
    forward seconds) of the last length measured, for extrapolating."""
    keys = jax.random.split(jax.random.PRNGKey(N), 4)
    q, k, v, ct = (jax.random.normal(key, (B, N, H, D), jnp.float32) for key in keys)
    steps, results = {}, {}
    for row in rows:
        for mode, fn, args in ((FWD, row.fn, (q, k, v)), (GRAD, with_grad(row.fn), (q, k, v, ct))):
            compiled = jax.jit(fn).lower(*args).compile()
            results[row.name, mode] = Result(compiled_bytes(compiled))
            steps[row.name, mode] = block(compiled, *args)

    def fits(key):
        result, budget = results[key], memory_budget()
        if result.nbytes > budget:
            result.skipped = (f"skipped: needs {result.nbytes / 2**30:.1f} GiB "
                              f"(> {budget / 2**30:.1f})")
        return result.skipped is None

    warm = {}  # key -> seconds of the warm-up run
    for row in rows:  # forwards first: a forward+backward's estimate is 3x its forward
        key = (row.name, FWD)
        if not fits(key):
            continue
        if row.name in previous:
            n0, t0 = previous[row.name]
            estimate = t0 * (N / n0) ** (2 if row.kind == "full" else 1)
            if estimate > 4 * FLAGS.max_seconds:
                results[key].skipped = f"skipped: ~{estimate:.0f} s a call"
                continue
        warm[key] = timed(steps[key])
    for row in rows:
        key = (row.name, GRAD)
        if not fits(key):
            continue
        if (row.name, FWD) not in warm:
            results[key].skipped = results[row.name, FWD].skipped
            continue
        estimate = 3 * warm[row.name, FWD]
        if estimate > FLAGS.max_seconds:
            results[key].skipped = f"skipped: ~{estimate:.0f} s a call"
            continue
        warm[key] = timed(steps[key])

    rounds = {}
    for key, seconds in warm.items():
        if seconds >= FLAGS.row_seconds:  # too slow to repeat: the warm-up run is the sample
            results[key].samples.append(seconds)
            rounds[key] = 0
        else:
            rounds[key] = min(FLAGS.repeats, max(1, int(FLAGS.row_seconds / seconds)))
    for r in range(max(rounds.values(), default=0)):
        for key, n in rounds.items():
            if r < n:
                results[key].samples.append(timed(steps[key]))
    for row in rows:
        if results[row.name, FWD].samples:
            previous[row.name] = (N, results[row.name, FWD].seconds)
    return results


# ----------------------------------------------------------------------------- reporting

def table_line(N, row, results, peak):
    cells = [str(N), row.name]
    for mode in (FWD, GRAD):
        r = results[row.name, mode]
        cells.append(f"{1e3 * r.seconds:,.1f}" if r.samples else r.skipped or "-")
    cells += [fmt_bytes(results[row.name, mode].nbytes) for mode in (FWD, GRAD)]
    for mode in (FWD, GRAD):
        ratio = paired_ratio(results[FULL, mode], results[row.name, mode])
        cells.append("-" if ratio is None else f"{ratio:,.2f}")
    for mode in (FWD, GRAD):
        cells.append(f"{results[FULL, mode].nbytes / results[row.name, mode].nbytes:,.1f}")
    for mode, factor in ((FWD, 1), (GRAD, 3)):
        r = results[row.name, mode]
        cells.append(f"{100 * factor * row.flops / r.seconds / peak:.1f}" if r.samples else "-")
    return "| " + " | ".join(cells) + " |"


def summary(all_results, lengths, block_sizes, look_backs, target_N, target_S, memory_N, peak):
    """Prints the issue's targets, met or not, with the numbers."""
    def local(N, S, lb, mode):
        return all_results.get(N, {}).get((f"seqjax local_attention S={S} look_back={lb}", mode))

    def full(N, mode):
        return all_results.get(N, {}).get((FULL, mode))

    print(f"\nSummary: the issue's CPU targets (N={target_N}, S={target_S} unless said; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s):")
    # 1. speed and memory of local (look_back 0) against full attention
    lo, fu = local(target_N, target_S, 0, FWD), full(target_N, FWD)
    if lo is None or fu is None:
        print(f"  local vs full: not measured (N={target_N} or S={target_S} not in the flags)")
    else:
        speed = paired_ratio(fu, lo)
        if speed is None:
            print(f"  forward speed-up >= 50x: not measured ({fu.skipped or lo.skipped})")
        else:
            print(f"  forward speed-up of local (look_back 0) over full >= 50x: "
                  f"{verdict(speed >= 50)}, {speed:,.1f}x ({1e3 * fu.seconds:,.0f} ms vs "
                  f"{1e3 * lo.seconds:,.1f} ms)")
        mem = fu.nbytes / lo.nbytes
        lo_g, fu_g = local(target_N, target_S, 0, GRAD), full(target_N, GRAD)
        print(f"  memory of full / local >= 20x: {verdict(mem >= 20)}, {mem:,.1f}x forward "
              f"({fmt_bytes(fu.nbytes)} vs {fmt_bytes(lo.nbytes)}); forward+backward "
              f"{fu_g.nbytes / lo_g.nbytes:,.1f}x ({fmt_bytes(fu_g.nbytes)} vs "
              f"{fmt_bytes(lo_g.nbytes)})")
    # 2. doubling N: time factor per doubling between consecutive lengths, the worst
    for mode in (FWD, GRAD):
        factors = []  # (factor per doubling, S, lb, N1, N2)
        for S in block_sizes:
            for lb in look_backs:
                timed_lengths = [N for N in lengths if (r := local(N, S, lb, mode)) and r.samples]
                for n1, n2 in zip(timed_lengths, timed_lengths[1:]):
                    t1, t2 = local(n1, S, lb, mode).seconds, local(n2, S, lb, mode).seconds
                    factors.append(((t2 / t1) ** (1 / math.log2(n2 / n1)), S, lb, n1, n2))
        if not factors:
            print(f"  doubling N <= 2.2x the time ({mode}): not measured (one length)")
            continue
        worst = max(factors)
        large = [f for f in factors if f[3] > min(lengths)]  # without the smallest length
        at_target = [f for f in factors if f[1] == target_S and f[2] == 0]
        print(f"  doubling N <= 2.2x the time of local attention ({mode}): "
              f"{verdict(worst[0] <= 2.2)}, worst {worst[0]:.2f}x per doubling "
              f"(S={worst[1]} look_back={worst[2]}, N {worst[3]} -> {worst[4]})"
              + (f"; from N={min(f[3] for f in large)} on: worst {max(large)[0]:.2f}x "
                 f"(S={max(large)[1]} look_back={max(large)[2]}, N {max(large)[3]} -> "
                 f"{max(large)[4]})" if large else "")
              + (f"; S={target_S} look_back=0: "
                 + ", ".join(f"{f[3]}->{f[4]} {f[0]:.2f}x" for f in at_target)
                 if at_target else ""))
    # 3. look_back 1 against look_back 0
    if 0 in look_backs and 1 in look_backs:
        for mode in (FWD, GRAD):
            ratios = {}  # (N, S) -> paired ratio
            for N in lengths:
                for S in block_sizes:
                    r0, r1 = local(N, S, 0, mode), local(N, S, 1, mode)
                    if r0 and r1 and (x := paired_ratio(r1, r0)) is not None:
                        ratios[N, S] = x
            if not ratios:
                continue
            worst = max(ratios, key=ratios.get)
            here = ratios.get((target_N, target_S))
            print(f"  look_back=1 <= 1.7x the time of look_back=0 ({mode}): "
                  f"{verdict(max(ratios.values()) <= 1.7)}, "
                  + (f"{here:.2f}x at N={target_N} S={target_S}; " if here else "")
                  + f"worst {ratios[worst]:.2f}x (N={worst[0]} S={worst[1]}); all: "
                  + ", ".join(f"{n}/{s} {x:.2f}" for (n, s), x in ratios.items()))
    else:
        print("  look_back=1 vs 0: not measured (--look_backs lacks 0 or 1)")
    # 4. memory at memory_N, for each local configuration
    if memory_N in all_results:
        for mode in (FWD, GRAD):
            sizes = {(S, lb): local(memory_N, S, lb, mode).nbytes
                     for S in block_sizes for lb in look_backs}
            print(f"  N={memory_N} {mode} within 2 GB: "
                  f"{verdict(max(sizes.values()) <= 2 * GB)} for all; "
                  + "; ".join(f"S={S} look_back={lb}: {verdict(n <= 2 * GB)}, {n / GB:.2f} GB"
                              for (S, lb), n in sizes.items()))
    else:
        print(f"  N={memory_N} within 2 GB: not measured (N={memory_N} not in --lengths)")
    # 5. FLOP rate of local attention's forward+backward
    r = local(target_N, target_S, 0, GRAD)
    if r is None or not r.samples:
        print("  local forward+backward >= 40% of matmul peak: not measured")
    else:
        flops = 3 * 4.0 * FLAGS.batch * FLAGS.heads * target_N * target_S * (
            FLAGS.d_model // FLAGS.heads)
        rate = flops / r.seconds
        print(f"  local forward+backward (look_back 0) >= 40% of the matmul peak: "
              f"{verdict(rate >= 0.4 * peak)}, {100 * rate / peak:.1f}% "
              f"({rate / 1e9:.1f} GFLOP/s)")


# ----------------------------------------------------------------------------- breakdown

def breakdown(N, S, B, H, D, causal, peak):
    """Where local_attention (look_back 0) at N, S spends its time, forward and forward plus
    backward, from a jax.profiler trace: each matrix product (every one computes 2 B H N S D
    FLOPs, so its rate is its own share of the peak) and the other ops, inside the scan over
    blocks or outside it."""
    keys = jax.random.split(jax.random.PRNGKey(N + 1), 4)
    q, k, v, ct = (jax.random.normal(key, (B, N, H, D), jnp.float32) for key in keys)
    library = lambda q, k, v: local_attention(q, k, v, block_size=S, causal=causal)
    matmul_flops = 2.0 * B * H * N * S * D
    print(f"\nWhere local_attention (look_back 0) at N={N}, S={S}, causal={causal} spends its "
          f"time (op times from a jax.profiler trace, summed over threads; a matmul's % peak is "
          f"its {matmul_flops / 1e9:.2f} GFLOP over its time):\n")
    print("| call | ops | ms | share | % peak |")
    print("| --- | --- | --- | --- | --- |")
    for name, fn, args in (("forward", library, (q, k, v)),
                           ("forward+backward", with_grad(library), (q, k, v, ct))):
        ops = op_profile(jax.jit(fn).lower(*args).compile(), args)
        total = sum(ms for ms, *_ in ops.values())
        matmuls = [ms for ms, _, is_matmul, _ in ops.values() if is_matmul]
        rates = [100 * matmul_flops / (ms / 1e3) / peak for ms in matmuls]
        parts = op_parts(ops)
        rows = [(f"{len(matmuls)} matmuls", sum(matmuls),
                 f"{min(rates):.0f} to {max(rates):.0f}" if rates else "-"),
                ("other ops in the scan", parts[False, True][0], "-"),
                ("other ops outside it", parts[False, False][0], "-")]
        for label, ms, rate in rows:
            print(f"| {name} | {label} | {ms:.1f} | {ms / total:.2f} | {rate} |")


# ----------------------------------------------------------------------------- main

def main(argv):
    del argv
    start = time.perf_counter()
    if FLAGS.quick:
        lengths, block_sizes, look_backs, repeats = [256, 1024], [32, 64], [0, 1], 2
        FLAGS.repeats, FLAGS.row_seconds, peak_size = repeats, 1.0, 1024
    else:
        lengths = [int(n) for n in FLAGS.lengths]
        block_sizes = [int(s) for s in FLAGS.block_sizes]
        look_backs = [int(lb) for lb in FLAGS.look_backs]
        repeats, peak_size = FLAGS.repeats, FLAGS.peak_size
    B, H = FLAGS.batch, FLAGS.heads
    if FLAGS.d_model % H:
        raise app.UsageError(f"--d_model={FLAGS.d_model} is not divisible by --heads={H}")
    D = FLAGS.d_model // H
    target_N = max(lengths) if FLAGS.quick else 16384
    target_S = max(block_sizes) if FLAGS.quick else 256
    memory_N = max(lengths) if FLAGS.quick else 65536

    print(environment(extras=[f"memory available {available_bytes() / 2**30:.1f} GiB",
                              load_average()]))
    peaks = [matmul_peak(peak_size)]
    print(f"matmul peak: float32 [{peak_size}, {peak_size}] @ [{peak_size}, {peak_size}], "
          f"best of 3: {peaks[0] / 1e9:.1f} GFLOP/s")
    print(f"float32; B={B}, H={H}, D={D} (d_model {FLAGS.d_model}); causal={FLAGS.causal}; "
          f"fwd+bwd = grad of sum(out * cotangent) w.r.t. q, k, v; up to {repeats} rounds "
          f"(--row_seconds={FLAGS.row_seconds:g} per row) after a warm-up; ms = median.")
    print("speed-up = seqjax full attention's time / this row's (local rows: the speed-up of "
          "local over full); memory / = full's compiled peak / this row's; % peak = useful "
          "FLOP/s as a percentage of the matmul peak above.\n")
    header = ["N", "implementation", "fwd ms", "fwd+bwd ms", "fwd peak memory",
              "fwd+bwd peak memory", "speed-up fwd", "speed-up fwd+bwd", "memory / fwd",
              "memory / fwd+bwd", "% peak fwd", "% peak fwd+bwd"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))

    all_results, previous = {}, {}
    for N in lengths:
        rows = make_rows(N, B, H, D, block_sizes, look_backs, FLAGS.causal)
        all_results[N] = results = measure_length(N, rows, B, H, D, previous)
        for row in rows:
            print(table_line(N, row, results, peaks[0]), flush=True)
    peaks.append(matmul_peak(peak_size))
    peak = max(peaks)
    print(f"\nmatmul peak again after the table: {peaks[1] / 1e9:.1f} GFLOP/s (the table used "
          f"{peaks[0] / 1e9:.1f}; the summary and breakdown use the higher, {peak / 1e9:.1f}); "
          f"{load_average()}")
    summary(all_results, lengths, block_sizes, look_backs, target_N, target_S, memory_N, peak)
    if FLAGS.breakdown and target_N in lengths:
        breakdown(target_N, target_S, B, H, D, FLAGS.causal, peak)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    app.run(main)
