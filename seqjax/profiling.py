"""Profiles from `jax.profiler` traces: a window of training steps traced by the engine
(`launch.py --profile_steps=A,B`), and where one compiled function spends its time, by HLO op
(the benchmarks' breakdowns).

A trace directory has jax's layout, `DIR/plugins/profile/<run>/<host>.xplane.pb`, which
TensorBoard's profile plugin opens (`tensorboard --logdir DIR`). A leaf module, like
`seqjax.plotting`: the engine and the benchmark scripts share it without importing each other.
"""

import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile

import jax

from seqjax import files

# ---------------------------------------------------------------------------------------------
# Traces and their files.
# ---------------------------------------------------------------------------------------------

def trace_files(log_dir: str, pattern: str = "*.xplane.pb") -> list[str]:
    """The files of every trace written under the local directory `log_dir` whose names match
    `pattern`, oldest run first (a run's directory is named by the time it was written)."""
    return sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", pattern)))


def read_events(log_dir: str) -> list[dict]:
    """The Chrome trace events of the newest trace under `log_dir` written with `perfetto`."""
    paths = trace_files(log_dir, "perfetto_trace.json.gz")
    if not paths:
        raise FileNotFoundError(f"no perfetto trace under {log_dir}/plugins/profile")
    with gzip.open(paths[-1]) as f:
        return json.load(f)["traceEvents"]


def parse_steps(text: str) -> tuple[int, int]:
    """(A, B) of a `--profile_steps=A,B` value: steps A to B, counted from 1 as the progress bar
    and metrics count them; a ValueError that says what is expected otherwise."""
    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError:
        steps = None
    return check_steps(steps, f"--profile_steps={text!r}")


def check_steps(steps, name: str | None = None) -> tuple[int, int]:
    """`steps` as a checked (A, B) pair of ints with 1 <= A <= B; `name` is what an error
    calls it (by default `profile_steps=` and its value)."""
    if not (isinstance(steps, (tuple, list)) and len(steps) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
            and 1 <= steps[0] <= steps[1]):
        raise ValueError(f"{name or f'profile_steps={steps!r}'}: expected two step numbers "
                         f"A,B with 1 <= A <= B, such as 10,20")
    return int(steps[0]), int(steps[1])


class StepWindow:
    """Traces steps `first` to `last` of a loop into `log_dir`: `before(step)` before a step
    runs, `after(step, state)` once it is dispatched, `close()` when the loop ends. The trace
    starts at the first step of the window the loop runs (a resumed run may start inside it)
    and stops after `last`; the state is waited for at both ends, so that the trace holds these
    steps' device work and no other's. Tracing only observes: the steps compute what they
    would untraced. jax.profiler writes to local directories only: a trace for a bucket
    (`log_dir` a URL) is written to a local temporary directory and copied there when it stops."""

    def __init__(self, steps, log_dir: str):
        self.first, self.last = check_steps(steps)
        self.log_dir = log_dir
        self.active = False
        self.traced = None  # (first, last) step traced, once written
        self.staging = None  # the local directory of a trace for a bucket

    def before(self, step: int, state):
        if not self.active and self.traced is None and self.first <= step <= self.last:
            jax.block_until_ready(state)
            if not files.is_local(self.log_dir):
                self.staging = tempfile.mkdtemp(prefix="seqjax-profile-")
            jax.profiler.start_trace(self.staging or self.log_dir)
            self.active, self.traced = True, (step, step)

    def after(self, step: int, state):
        if self.active:
            self.traced = (self.traced[0], step)
            if step >= self.last:
                jax.block_until_ready(state)
                self._stop()

    def close(self):
        """Writes the trace of a loop that ended inside the window (stopped early, or failed)."""
        if self.active:
            self._stop()

    def summary(self) -> str:
        if self.traced is None:
            return (f"profile_steps={self.first},{self.last}: none of these steps ran; "
                    f"nothing was traced")
        first, last = self.traced
        return f"wrote a profile of steps {first}-{last} to {self.log_dir}"

    def _stop(self):
        self.active = False
        jax.profiler.stop_trace()
        if self.staging is not None:
            try:
                files.copy_tree(self.staging, self.log_dir)
            finally:
                shutil.rmtree(self.staging)


# ---------------------------------------------------------------------------------------------
# Where a compiled function spends its time, by HLO op.
# ---------------------------------------------------------------------------------------------

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


def op_profile(compiled, args=(), runs: int = 3, call=None) -> dict:
    """{HLO op name: (milliseconds per run, calls per run, is a matmul, JAX op_name)} of
    `compiled(*args)` (a `jax.stages.Compiled`; its arguments must not be donated), from a
    `jax.profiler` trace of `runs` runs after a warm-up. A step that donates its arguments
    passes `call` instead of `args`: a function of no arguments that runs `compiled` once and
    threads its state. Ops that run in a loop appear once, with their calls and total time.
    Times are summed over the threads ops run on, so with ops running side by side the total
    can exceed the wall time."""
    step = lambda: jax.block_until_ready(call() if call else compiled(*args))
    step()
    hlo_text = compiled.as_text()
    module = re.match(r"HloModule ([\w.\-]+)", hlo_text).group(1)
    hlo_ops = _hlo_ops(hlo_text)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(runs):
                step()
        events = read_events(trace_dir)
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


def op_label(op_name: str, hlo_name: str = "") -> str:
    """A JAX op_name as one line of a profile: its jit and jvp wrappers dropped, the numbers of
    repeated modules merged (`blocks_3/Dropout_0` -> `blocks_*/Dropout_*`), and 'backward: '
    before the ops of the gradient (under `transpose(...)`). An op without an op_name (XLA's
    own, such as a fused optimiser update) is named by its HLO instruction `hlo_name`."""
    parts = op_name.split("/")
    kept = [p for p in parts if p and not re.match(r"(jit|jvp|transpose)\(", p)]
    if not kept:
        hlo_kind = re.sub(r"[.]\d+$", "", hlo_name) or "unnamed"
        return f"({hlo_kind}, no op_name)"
    backward = any(p.startswith("transpose(") for p in parts)
    return ("backward: " if backward else "") + re.sub(r"_\d+(?=/|$)", "_*", "/".join(kept))


def op_totals(ops: dict) -> list[tuple[str, float, bool]]:
    """(op_label, ms per run, is a matmul) of an `op_profile` result, the ops of one label
    summed (a layer's repeats, a matmul's fusions), slowest first."""
    totals, matmul = collections.Counter(), {}
    for name, (ms, _, is_matmul, op_name) in ops.items():
        label = op_label(op_name, name)
        totals[label] += ms
        matmul[label] = matmul.get(label, False) or is_matmul
    return [(label, ms, matmul[label]) for label, ms in totals.most_common()]
