"""Helpers shared by the benchmark scripts in this folder (mlm.py, attention.py, recurrent.py).

No absl flags are defined here, so every script can import it (each script defines its own
flags; importing one script from another would define them twice). The scripts import it as
`from common import ...`, which works because running `python benchmarks/X.py` puts this
folder on sys.path.
"""

import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

import flax
import jax
import jax.numpy as jnp

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


def block(f, *args):
    """A step for `timed` and `interleaved_times`: f(*args), blocking until it is ready."""
    return lambda: jax.block_until_ready(f(*args))


def timed(step) -> float:
    """Wall seconds of one call of `step` (which must block until its result is ready)."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def matmul_peak(P: int) -> float:
    """FLOP/s of a jitted float32 [P, P] @ [P, P], the best of 3 runs after a warm-up."""
    a, b = (jax.random.normal(key, (P, P), jnp.float32)
            for key in jax.random.split(jax.random.PRNGKey(7)))
    step = block(jax.jit(jnp.matmul).lower(a, b).compile(), a, b)
    step()
    return 2.0 * P ** 3 / min(timed(step) for _ in range(3))


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


def verdict(ok) -> str:
    return "met" if ok else "NOT met"


def _hlo_ops(hlo_text: str) -> dict:
    """{instruction name: (is a matrix product, the JAX op_name of its metadata or '')} of a
    compiled HLO module, without loops and calls (the ops of their bodies are listed and
    timed themselves). Matrix products are `dot`s, library calls whose target names a matmul
    or GEMM (oneDNN, cuBLAS), and fusions whose computation contains one of those (XLA:CPU
    wraps its library matmuls in fusions)."""
    computations, ops, body = {}, {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"(?:ENTRY )?%([\w.\-]+) \(.*\{$", line)
        if head:
            body = computations.setdefault(head.group(1), [])
            continue
        op = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\(", line)
        if op and body is not None:
            target = re.search(r'custom_call_target="([^"]*)"', line)
            kind = "dot" if op.group(2) == "dot" or (
                target and re.search(r"matmul|gemm", target.group(1), re.I)) else op.group(2)
            body.append(kind)
            called = re.search(r"calls=%([\w.\-]+)", line)
            op_name = re.search(r'op_name="([^"]*)"', line)
            ops[op.group(1)] = (kind, called.group(1) if called else None,
                                op_name.group(1) if op_name else "")
    return {name: (kind == "dot" or "dot" in computations.get(called, ()), op_name)
            for name, (kind, called, op_name) in ops.items()
            if kind not in ("while", "conditional", "call")}  # their time is their bodies'


def op_profile(compiled, args, runs: int = 3) -> dict:
    """{HLO op name: (milliseconds per run, calls per run, is a matmul, JAX op_name)} of
    `compiled(*args)` (a `jax.stages.Compiled`; its arguments must not be donated), from a
    `jax.profiler` trace of `runs` runs after a warm-up. Ops that run in a loop appear once,
    with their calls and total time. Times are summed over the threads ops run on, so with
    ops running side by side the total can exceed the wall time."""
    step = block(compiled, *args)
    step()
    hlo_text = compiled.as_text()
    module = re.match(r"HloModule ([\w.\-]+)", hlo_text).group(1)
    hlo_ops = _hlo_ops(hlo_text)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(runs):
                step()
        (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                            recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    total, calls = collections.Counter(), collections.Counter()
    for event in events:
        name = event.get("args", {}).get("hlo_op")
        if (event.get("ph") == "X" and name in hlo_ops
                and event["args"].get("hlo_module", module) == module):
            total[name] += event["dur"]
            calls[name] += 1
    return {name: (total[name] / 1e3 / runs, calls[name] // runs, *hlo_ops[name])
            for name in total}


def op_parts(ops: dict) -> dict:
    """{(is a matmul, runs in a loop): (ms per run, distinct ops)} of an `op_profile` result;
    an op called more than once per run is in a loop."""
    parts = collections.defaultdict(lambda: (0.0, 0))
    for ms, calls, is_matmul, _ in ops.values():
        total, count = parts[is_matmul, calls > 1]
        parts[is_matmul, calls > 1] = (total + ms, count + 1)
    return parts
