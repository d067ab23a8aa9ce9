r"""Training-step throughput of seqjax's recurrent layers against Flax's and PyTorch's.

    python benchmarks/recurrent.py              # the full table: minutes on 2 CPU cores
    python benchmarks/recurrent.py --quick      # tiny sizes, a smoke test (about a minute,
                                                # mostly compiling)
    python benchmarks/recurrent.py --cells=lstm --hidden=512 --seq_len=128 --layers=1,2
    python benchmarks/recurrent.py --profile    # also where seqjax's step spends its time

One training step is the gradient of loss = mean(outputs**2) with respect to the parameters
and the inputs (forward plus backward through time), jitted in JAX; throughput is
batch * time / (median seconds per step), after a warm-up that compiles. Every row of a size
is compared with seqjax's default layer of the same cell type (`StackedRecurrent`):
"seqjax speed-up" = seqjax tokens/s / this row's tokens/s, so above 1 means seqjax is faster.
Machines are shared and noisy: the rows of one size run in turn, round after round, and the
ratio is the median of the per-round ratios; the ratios are the result, not the absolute
numbers. torch's OpenMP threads sleep rather than spin while they wait (OMP_WAIT_POLICY=
PASSIVE, see --omp_wait_policy): on a machine shared with other jobs, spinning made torch up
to 8x slower at these sizes.

Rows: seqjax `StackedRecurrent` (GRU in its textbook form, and with `reset_after=True`, the
form Flax and PyTorch use); Flax `nn.RNN` over `nn.SimpleCell`, `nn.GRUCell`, `nn.LSTMCell`
and `nn.OptimizedLSTMCell`, stacked once per layer; and, when torch can be imported,
`torch.nn.RNN` (tanh), `torch.nn.GRU` and `torch.nn.LSTM`, one row per `--torch_threads` count.

Threads: XLA's CPU backend runs each matmul on a thread pool of os.cpu_count() threads. At the
per-step sizes of a recurrence ([32, 512] @ [512, 2048] is 67 MFLOP) the synchronisation can
cost more than the second thread gains: on a 2-vCPU virtual machine the scan's matmuls ran at
98 GFLOP/s single-threaded against 80 with two threads. Compare both settings with
    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python benchmarks/recurrent.py --torch_threads=1,2
"""

import os
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from seqjax.nn.recurrent import StackedRecurrent

from common import block, environment, interleaved_times, op_parts, op_profile, paired_median

torch = None  # imported in main(), optionally, after the OpenMP environment is set

flags.DEFINE_list("hidden", ["256", "512"], "Hidden sizes H (the input width is H too).")
flags.DEFINE_list("seq_len", ["35", "128"], "Sequence lengths T.")
flags.DEFINE_list("layers", ["1", "2"], "Numbers of stacked layers.")
flags.DEFINE_integer("batch", 32, "Batch size B.")
flags.DEFINE_integer("repeats", 7, "Timed rounds; each runs every row of a size once.")
flags.DEFINE_list("cells", ["rnn", "gru", "lstm"], "Cell types: rnn, gru, lstm.")
flags.DEFINE_bool("torch", True, "Include PyTorch rows when torch is importable.")
flags.DEFINE_list("torch_threads", [], "torch thread counts, one torch row per count; default: "
                  "os.cpu_count(), the cores XLA's CPU thread pool uses.")
flags.DEFINE_string(
    "omp_wait_policy", "PASSIVE",
    "OMP_WAIT_POLICY for torch's OpenMP threads, unless the environment sets it; '' leaves "
    "OpenMP's default (spinning), which on a loaded machine can make torch several times slower.")
flags.DEFINE_bool("quick", False, "Tiny sizes and 3 repeats, a smoke test.")
flags.DEFINE_bool("profile", False, "After each size's rows, break seqjax's step down by kind "
                  "of op (matmul or not, in the time loop or not) from a jax.profiler trace.")
FLAGS = flags.FLAGS

SEQJAX = "seqjax"  # the reference implementation of each cell type


class SeqjaxStack(nn.Module):
    """seqjax's `StackedRecurrent`, returning only the outputs (extra fields: `kwargs`)."""

    cell_type: str
    features: int
    num_layers: int
    kwargs: tuple = ()

    @nn.compact
    def __call__(self, x_BxTxF):
        return StackedRecurrent(self.cell_type, self.features, num_layers=self.num_layers,
                                **dict(self.kwargs))(x_BxTxF)[1]


class FlaxStack(nn.Module):
    """`num_layers` of Flax's `nn.RNN` over `cell_cls(features)`, one after another."""

    cell_cls: type
    features: int
    num_layers: int

    @nn.compact
    def __call__(self, x_BxTxF):
        for _ in range(self.num_layers):
            x_BxTxF = nn.RNN(self.cell_cls(self.features))(x_BxTxF)
        return x_BxTxF


def _seqjax(cell_type, **kwargs):
    return lambda H, L: SeqjaxStack(cell_type, H, L, tuple(kwargs.items()))


def _flax(cell_cls):
    return lambda H, L: FlaxStack(cell_cls, H, L)


# cell type -> [(row name, builder (H, L) -> Flax module of x_BxTxH)]; the first is the reference.
JAX_ROWS = {
    "rnn": [(SEQJAX, _seqjax("rnn")), ("flax SimpleCell", _flax(nn.SimpleCell))],
    "gru": [(SEQJAX, _seqjax("gru")), ("seqjax reset_after", _seqjax("gru", reset_after=True)),
            ("flax GRUCell", _flax(nn.GRUCell))],
    "lstm": [(SEQJAX, _seqjax("lstm")), ("flax LSTMCell", _flax(nn.LSTMCell)),
             ("flax OptimizedLSTMCell", _flax(nn.OptimizedLSTMCell))],
}
TORCH_ROWS = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}


def jax_step(module: nn.Module, x_BxTxF):
    """One compiled training step, value_and_grad of mean(outputs**2) w.r.t. (params, inputs),
    and its arguments."""
    params = module.init(jax.random.PRNGKey(0), x_BxTxF)

    def loss(params, x):
        return jnp.mean(jnp.square(module.apply(params, x)))

    args = (params, x_BxTxF)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile(), args


def print_profile(compiled, args, cell: str, B: int, T: int, H: int, L: int):
    """Where seqjax's training step spends its time, from a profiler trace, by kind of op."""
    parts = op_parts(op_profile(compiled, args))  # in the loop: unless T <= unroll
    total = sum(ms for ms, _ in parts.values())
    G = {"rnn": 1, "gru": 3, "lstm": 4}[cell] * H
    flops = L * 6 * B * T * (H + H) * G  # forward: x W_x and h W_h; backward: twice that
    matmul_ms = parts[True, True][0] + parts[True, False][0]
    rate = f"{flops / matmul_ms / 1e6:.1f} GFLOP/s" if matmul_ms else "(no matmul op found)"
    print(f"\nWhere seqjax's {cell} step goes (L={L} H={H} T={T}; op times from a "
          f"jax.profiler trace, {total:.1f} ms per step in all; matmuls at {rate} overall):\n")
    print("| ops | ms/step | share | distinct ops |")
    print("| --- | --- | --- | --- |")
    labels = {(True, True): "matmuls in the time loop (h @ W_h and its transpose backward; "
                            "the textbook GRU's dW_h too)",
              (True, False): "matmuls outside the loop (x @ W_x, dx, dW_x, and dW_h)",
              (False, True): "elementwise in the loop (gates, their derivatives, stacking)",
              (False, False): "elementwise outside the loop (layout copies, bias add and sum, "
                              "buffer fills)"}
    for key, label in labels.items():
        ms, count = parts[key]
        print(f"| {label} | {ms:.1f} | {ms / total:.2f} | {count} |")
    print()


def torch_step(kind: str, H: int, L: int, B: int, T: int, threads: int):
    """The same training step for torch.nn.{RNN,GRU,LSTM}: forward, mean(out**2), backward."""
    torch.manual_seed(0)
    layer = getattr(torch.nn, kind)(H, H, num_layers=L, batch_first=True)
    x = torch.randn(B, T, H, requires_grad=True)

    def step():
        torch.set_num_threads(threads)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = layer(x)
        loss = out.pow(2).mean()
        loss.backward()
        return loss.item()

    return step


def _torch_name(kind: str, threads: int) -> str:
    return f"torch nn.{kind} ({threads} thread{'s' if threads > 1 else ''})"


def _import_torch() -> bool:
    """Imports torch if it is installed; OpenMP reads OMP_WAIT_POLICY when torch loads it."""
    global torch
    if FLAGS.omp_wait_policy:
        os.environ.setdefault("OMP_WAIT_POLICY", FLAGS.omp_wait_policy)
    try:
        import torch as torch_module
    except ImportError:
        return False
    torch = torch_module
    return True


def main(argv):
    del argv
    if FLAGS.quick:
        hiddens, seq_lens, layers, B, repeats = [16], [8], [1, 2], 4, 3
    else:
        hiddens, seq_lens = [int(h) for h in FLAGS.hidden], [int(t) for t in FLAGS.seq_len]
        layers, B, repeats = [int(n) for n in FLAGS.layers], FLAGS.batch, FLAGS.repeats
    unknown = set(FLAGS.cells) - set(JAX_ROWS)
    if unknown:
        raise app.UsageError(f"unknown cells {sorted(unknown)}; expected {sorted(JAX_ROWS)}")
    use_torch = FLAGS.torch and _import_torch()

    torch_threads = [int(n) for n in FLAGS.torch_threads] or [os.cpu_count()]
    print(environment())
    if use_torch:
        print(f"torch {torch.__version__}: rows with set_num_threads({torch_threads}); "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    else:
        print("torch: " + ("disabled by --notorch" if not FLAGS.torch else "not importable")
              + "; its rows are skipped")
    print(f"float32; batch B={B}; input width = hidden size H; training step = value_and_grad "
          f"of mean(outputs**2) w.r.t. params and inputs, jitted; the rows of a size run in "
          f"turn for {repeats} rounds after 2 warm-up rounds; ms/step is the median, "
          f"tokens/s = B*T / that.")
    print("seqjax speed-up = seqjax tokens/s / this row's tokens/s, as the median over rounds "
          "of (this row's time / seqjax's time in the same round); above 1: seqjax faster.\n")
    print("| cell | layers | H | T | implementation | ms/step | tokens/s | seqjax speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")

    results = {}  # (cell, L, H, T) -> {row name: seqjax speed-up over it}
    for cell in FLAGS.cells:
        for L in layers:
            for H in hiddens:
                for T in seq_lens:
                    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, H), jnp.float32)
                    compiled_and_args = {name: jax_step(build(H, L), x)
                                         for name, build in JAX_ROWS[cell]}
                    steps = {name: block(f, *args)
                             for name, (f, args) in compiled_and_args.items()}
                    for n in torch_threads if use_torch else []:
                        kind = TORCH_ROWS[cell]
                        steps[_torch_name(kind, n)] = torch_step(kind, H, L, B, T, n)
                    times = interleaved_times(steps, repeats)
                    got = results[(cell, L, H, T)] = {}
                    for name, ts in times.items():
                        seconds = statistics.median(ts)
                        # median over rounds of (this row's time / seqjax's time in that round)
                        got[name] = paired_median(ts, times[SEQJAX])
                        print(f"| {cell} | {L} | {H} | {T} | {name} | {1e3 * seconds:.2f} | "
                              f"{B * T / seconds:,.0f} | {got[name]:.2f} |", flush=True)
                    if FLAGS.profile:
                        print_profile(*compiled_and_args[SEQJAX], cell, B, T, H, L)

    print("\nSummary: seqjax tokens/s over the other's, the minimum over sizes (and where):")
    for cell in FLAGS.cells:
        parts = []
        for label, names in (("best Flax", [n for n, _ in JAX_ROWS[cell] if n.startswith("flax")]),
                             ("best torch", [_torch_name(TORCH_ROWS[cell], n)
                                             for n in torch_threads] if use_torch else [])):
            if not names:
                continue
            ratios = {key: min(got[n] for n in names)  # the fastest of `names`
                      for key, got in results.items() if key[0] == cell}
            key = min(ratios, key=ratios.get)
            parts.append(f"vs {label} {ratios[key]:.2f} (L={key[1]} H={key[2]} T={key[3]}; "
                         f"median over sizes {statistics.median(ratios.values()):.2f})")
        print(f"  {cell}: " + "; ".join(parts))


if __name__ == "__main__":
    app.run(main)
