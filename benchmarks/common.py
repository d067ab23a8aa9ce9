"""Helpers shared by the benchmark scripts in this folder (mlm.py, attention.py, recurrent.py,
packing.py, long_bert.py, accelerator.py and its row_runner.py).

No absl flags are defined here, so every script can import it (each script defines its own
flags; importing one script from another would define them twice). The scripts import it as
`from common import ...`, which works because running `python benchmarks/X.py` puts this
folder on sys.path.
"""

import functools
import os
import statistics
import time

import flax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from seqjax.nn.linear_recurrent import LinearRecurrentStack
from seqjax.nn.recurrent import StackedRecurrent

# The op breakdown from a profiler trace lives in the package, which the engine's step traces
# share; the scripts import it from here with the rest.
from seqjax.profiling import op_parts, op_profile  # noqa: F401
from seqjax.train import loop, parallel
from seqjax.train.optimizer import make_optimizer
from seqjax.train.step import state_specs, train_step

# P of the P x P @ P x P float32 matmul that measures the machine's peak FLOP rate: the
# default of every benchmark's --peak_size, so their "% peak" are against the same matmul.
PEAK_SIZE = 4096


def environment(modules=(jax, flax), extras=()) -> str:
    """The banner line: the versions of `modules`, the backend and devices, os.cpu_count(),
    XLA_FLAGS, then `extras`, all separated by '; '."""
    versions = ", ".join(f"{m.__name__} {m.__version__}" for m in modules)
    return "; ".join([
        versions, f"backend {jax.default_backend()}, devices {jax.devices()}",
        f"os.cpu_count() {os.cpu_count()}",
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '(unset)')!r}", *extras])


def load_average() -> str:
    return f"load average {os.getloadavg()[0]:.1f}"


def available_bytes() -> int:
    """The host's MemAvailable (0 where /proc/meminfo does not list it)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def compiled_bytes(compiled) -> int:
    """An executable's peak memory by XLA's memory analysis: its arguments, outputs and temp
    buffer (its intermediates, as buffer assignment packed them), less aliased bytes. (On CPU
    the analysis' peak_memory_in_bytes leaves out the temp buffer.)"""
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def block(f, *args):
    """A step for `timed` and `interleaved_times`: f(*args), blocking until it is ready."""
    return lambda: jax.block_until_ready(f(*args))


def timed(step) -> float:
    """Wall seconds of one call of `step` (which must block until its result is ready)."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def matmul_peak(P: int, dtype=jnp.float32, calls: int = 1) -> float:
    """FLOP/s of a jitted [P, P] @ [P, P] in `dtype`, the best of 3 rounds after a warm-up; a
    round queues `calls` products back to back and blocks once (one blocked call of a fast
    matmul on an accelerator would time its dispatch too)."""
    a, b = (jax.random.normal(key, (P, P), dtype)
            for key in jax.random.split(jax.random.PRNGKey(7)))
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(matmul(a, b))

    def round_of_calls():
        for _ in range(calls):
            out = matmul(a, b)
        jax.block_until_ready(out)

    return calls * 2.0 * P ** 3 / min(timed(round_of_calls) for _ in range(3))


def interleaved_times(steps: dict, repeats: int, warmup: int = 2) -> dict:
    """{name: wall times of each `steps[name]()`, in round order} (each step must block until
    its result is ready): `warmup` warm-up rounds (the first may compile), then `repeats`
    rounds that run every step once in turn, so that a change of load on a shared machine hits
    all rows alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step))
    return times


def paired_median(num, den):
    """The median over rounds of num[i] / den[i], pairing two lists of samples in round order;
    None when there are no pairs."""
    ratios = [a / b for a, b in zip(num, den)]
    return statistics.median(ratios) if ratios else None


class EngineTrainer:
    """The engine's own training step of `task` (`seqjax.train.step.train_step` with the
    config's optimizer), compiled on one device as the training loop compiles it
    (`seqjax.train.parallel`, the state donated), from the fresh state the loop starts with, on
    the task's first `batches` training batches (`task.train_batch`), cycling.

    Calling it with `steps` runs that many steps and blocks until they are done; `batches`
    holds those batches as the task gave them (on the host); `compile()` is the step's
    executable, lowered for the current state and the first batch (for its
    `memory_analysis()`); `par` is its `seqjax.train.parallel` placement."""

    def __init__(self, task, config, batches: int = 8):
        tx = make_optimizer(config.opt, config.num_train_steps, task.frozen)
        self.par = par = parallel.make(config.parallel, jax.local_devices()[:1])
        step = functools.partial(train_step, loss_fn=task.loss, tx=tx)
        self._p_train = par.compile(step, (state_specs(), parallel.BATCH),
                                    (state_specs(), PartitionSpec()), donate=True)
        self.batches = [task.train_batch(step) for step in range(batches)]
        self._on_device = [par.batch(b) for b in self.batches]
        host, _ = loop._fresh_state(config, None, task, tx)
        self._state, self._step = parallel.to_devices(host, par), 0

    def __call__(self, steps: int):
        for _ in range(steps):
            self._state, _ = self._p_train(self._state,
                                           self._on_device[self._step % len(self._on_device)])
            self._step += 1
        jax.block_until_ready(self._state.params)

    def params(self):
        """The current parameters, placed as the loop's evaluation reads them."""
        return self._state.params

    def compile(self):
        return self._p_train.lower(self._state, self._on_device[0]).compile()


def verdict(ok) -> str:
    return "met" if ok else "NOT met"


def _linear(cell, method):
    return lambda H: LinearRecurrentStack(cell, H, num_layers=1, method=method)


# The linear recurrences' benchmark rows (linear_recurrent.py, accelerator.py): row name ->
# builder H -> a Flax module whose __call__(x) returns (carries, outputs).
LSTM_ROW = "lstm (sequential)"
RECURRENT_ROWS = {
    LSTM_ROW: lambda H: StackedRecurrent("lstm", H, num_layers=1),
    "mingru associative": _linear("mingru", "associative"),
    "mingru sequential": _linear("mingru", "sequential"),
    "minlstm associative": _linear("minlstm", "associative"),
    "lru associative": _linear("lru", "associative"),
    "lru sequential": _linear("lru", "sequential"),
}
