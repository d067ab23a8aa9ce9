"""How benchmarks/accelerator.py measures a row: compiling it ahead of time (`compile_timed`,
`Step`), timing it (`time_step`), its compiled and device memory, and the `Run` that queues a
group's rows, builds them side by side, times them one after another, writes the JSON after
each and prints the table. A row's failure (out of memory, an unsupported configuration) is its
status and note, and the other rows go on. Rows queued with profile=True, or named in
`profile`, are traced after they are timed (`seqjax.profiling.op_profile`): where their step
spends its time, by JAX op."""

import concurrent.futures
import gc
import json
import statistics
import time
import traceback

import jax
import numpy as np

from seqjax.profiling import op_profile, op_totals

from common import available_bytes, compiled_bytes, timed

GiB = 2 ** 30


def device_limit_bytes():
    """The memory the default device can hold: its allocator's limit where it reports one, else
    (a CPU) the host's MemAvailable."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"]
    try:
        return available_bytes() or None
    except OSError:
        return None


def device_peak_bytes():
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def memory_of(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return dict(temp_bytes=m.temp_size_in_bytes, argument_bytes=m.argument_size_in_bytes,
                output_bytes=m.output_size_in_bytes, alias_bytes=m.alias_size_in_bytes,
                compiled_bytes=compiled_bytes(compiled))


def is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def one_line(error: Exception, width: int = 160) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:width]


def compile_timed(fn, *args, **jit_kwargs):
    """(compiled, seconds tracing and lowering, seconds in XLA's compiler) of jax.jit(fn)."""
    start = time.perf_counter()
    lowered = jax.jit(fn, **jit_kwargs).lower(*args)
    middle = time.perf_counter()
    return lowered.compile(), middle - start, time.perf_counter() - middle


class Step:
    """A compiled step and its arguments; `donate` threads the first argument (the training
    state) through the calls, as a training loop does."""

    def __init__(self, compiled, args, donate: bool, lower_s: float, xla_s: float):
        self.compiled, self.args, self.donate = compiled, list(args), donate
        self.lower_s, self.xla_s, self.last = lower_s, xla_s, None

    def __call__(self):
        out = self.compiled(*self.args)
        if self.donate:
            self.args[0], out = out
        self.last = jax.block_until_ready(out)


def time_step(step: Step, warmup: int, steps: int, row_seconds: float) -> list:
    """Wall seconds of the timed calls of `step` (each blocked until ready), after `warmup`
    calls: at most `steps`, fewer when they would take over `row_seconds`."""
    first = timed(step)
    for _ in range(warmup - 1 if first <= row_seconds else 0):
        first = min(first, timed(step))
    count = max(1, min(steps, int(row_seconds / first)))
    return [timed(step) for _ in range(count)]


class Run:
    """The rows measured so far, the JSON written after each one, and the table.

    A group's runner queues its rows (`measure`, `skip`) and `flush` runs them: it builds every
    queued row first, --compile_threads at a time (XLA's compiler releases the GIL, and a big
    training step can take a minute to compile on an accelerator's host), then times them one
    after another, in order, with nothing else running."""

    def __init__(self, out: str, info: dict, compile_threads: int, warmup: int, steps: int,
                 row_seconds: float, profile=(), profile_top: int = 12):
        self.out, self.info, self.rows, self.groups = out, info, [], {}
        self.timing = (warmup, steps, row_seconds)
        self.profile, self.profile_top = tuple(profile), profile_top
        self.peak = info["peak_measured_flops"]
        self.datasheet = info["peak_datasheet_flops"]
        self.compile_threads, self.queue = compile_threads, []

    def write(self):
        with open(self.out, "w") as f:
            json.dump(dict(self.info, groups=self.groups, rows=self.rows), f, indent=1)

    def add(self, record: dict):
        self.rows.append(record)
        self.groups.setdefault(record["group"], {"elapsed_s": None})
        self.write()
        print(f"  [{record['group']}] {record['name']}: {summary_of(record)}", flush=True)
        return record

    def measure(self, group: str, name: str, build, *, tokens: int, flops=None,
                compile_only: bool = False, **extra):
        """Queues a row: `build()` -> a Step, timed unless `compile_only`."""
        record = dict(group=group, name=name, status="ok", note="", tokens=tokens, flops=flops,
                      **extra)
        self.queue.append((record, build, compile_only))

    def skip(self, group: str, name: str, status: str, note: str, **extra):
        self.queue.append((dict(group=group, name=name, status=status, note=note, **extra),
                           None, True))

    def flush(self) -> list:
        """Builds, checks and times the queued rows; returns their records. Any failure is the
        row's status and note, and the other rows go on."""
        queue, self.queue = self.queue, []
        builds = [(record, build) for record, build, _ in queue if build is not None]
        if builds:
            threads = max(1, min(self.compile_threads, len(builds)))
            print(f"  [{builds[0][0]['group']}] compiling {len(builds)} row(s), {threads} at a "
                  f"time", flush=True)
        with concurrent.futures.ThreadPoolExecutor(max(1, self.compile_threads)) as pool:
            futures = [pool.submit(self._build, record, build) if build else None
                       for record, build, _ in queue]
            steps = [future.result() if future else None for future in futures]
        records = []
        for (record, _, compile_only), i in zip(queue, range(len(steps))):
            step, steps[i] = steps[i], None  # each row's buffers go when it is done
            records.append(self._finish(record, step, compile_only))
        return records

    @staticmethod
    def _build(record: dict, build):
        start = time.perf_counter()
        try:
            step = build()
        except Exception as error:
            record.update(status="OOM" if is_oom(error) else "failed", note=one_line(error))
            if not is_oom(error):
                traceback.print_exc(limit=3)
            return None
        record.update(build_s=time.perf_counter() - start, lower_s=step.lower_s,
                      compile_s=step.xla_s, **memory_of(step.compiled))
        print(f"  [{record['group']}] {record['name']}: compiled in {step.xla_s:.1f} s "
              f"(lowered in {step.lower_s:.1f} s)", flush=True)
        return step

    def _finish(self, record: dict, step, compile_only: bool) -> dict:
        try:
            limit = device_limit_bytes()
            if step is None or compile_only:
                pass
            elif limit and record.get("compiled_bytes", 0) > limit:
                record.update(status="OOM", note=f"compiled needs "
                              f"{fmt_bytes(record['compiled_bytes'])} > {fmt_bytes(limit)}")
            else:
                self._time(record, step)
                if record.get("profile") or any(part in record["name"] for part in self.profile):
                    self._profile(record, step)
        except Exception as error:  # one row's failure is a line of the table, not the end
            record.update(status="OOM" if is_oom(error) else "failed", note=one_line(error))
            if not is_oom(error):
                traceback.print_exc(limit=3)
        finally:
            if step is not None:
                record["device_peak_bytes"] = device_peak_bytes()
            del step
            gc.collect()
        return self.add(record)

    def _time(self, record: dict, step: Step):
        times = time_step(step, *self.timing)
        seconds, flops = statistics.median(times), record["flops"]
        record.update(step_s=seconds, steps_timed=len(times), best_step_s=min(times),
                      tokens_per_s=record["tokens"] / seconds, flops_per_s=flops / seconds,
                      mfu_measured=flops / seconds / self.peak if self.peak else None,
                      mfu_datasheet=flops / seconds / self.datasheet if self.datasheet
                      else None)
        loss = step.last[0] if isinstance(step.last, tuple) else step.last
        if loss is not None and np.ndim(loss) == 0 and not np.isfinite(float(loss)):
            record["note"] = f"non-finite loss {float(loss)}"

    def _profile(self, record: dict, step: Step):
        """The row's ops by time per step, from a trace of 2 more steps: `profile_ms` in all
        (summed over the streams or threads they ran on), `profile_matmul_ms` of it in matrix
        products, and the `profile_top` labels (`seqjax.profiling.op_label`)."""
        try:
            totals = op_totals(op_profile(step.compiled, runs=2, call=step))
        except Exception as error:  # a profile is extra: its failure is a note, not the row's
            record["profile_note"] = one_line(error)
            return
        if not totals:
            record["profile_note"] = "the trace has no events of this program's ops"
            return
        record.update(profile_ms=sum(ms for _, ms, _ in totals),
                      profile_matmul_ms=sum(ms for _, ms, matmul in totals if matmul),
                      profile_top=[dict(op=label, ms=ms, matmul=matmul)
                                   for label, ms, matmul in totals[:self.profile_top]])

    def group_done(self, group: str, seconds: float, **extra):
        self.groups[group] = dict(self.groups.get(group, {}), elapsed_s=seconds, **extra)
        self.write()
        print(f"[{group}] {seconds:.1f} s", flush=True)


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / 2 ** 20:.1f} MiB"


def summary_of(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {r['note']}"
    if "step_s" not in r:
        return f"temp {fmt_bytes(r.get('temp_bytes'))}"
    return (f"{1e3 * r['step_s']:.2f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {pct(r['mfu_measured'])} measured / {pct(r['mfu_datasheet'])} datasheet")


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_table(run: Run):
    header = ["group", "row", "tokens/step", "ms/step", "tokens/s", "TFLOP/s", "MFU (measured)",
              "MFU (datasheet)", "compiled temp", "compiled total", "device peak", "compile s",
              "note"]
    print("\n| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in run.rows:
        timed_ok = r["status"] == "ok" and "step_s" in r
        cells = [r["group"], r["name"], f"{r['tokens']:,}" if r.get("tokens") else "-"]
        if timed_ok:
            cells += [f"{1e3 * r['step_s']:,.2f}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['flops_per_s'] / 1e12:,.2f}", pct(r["mfu_measured"]),
                      pct(r["mfu_datasheet"])]
        else:
            cells += [r["status"] if r["status"] != "ok" else "-"] + ["-"] * 4
        cells += [fmt_bytes(r.get("temp_bytes")), fmt_bytes(r.get("compiled_bytes")),
                  fmt_bytes(r.get("device_peak_bytes")),
                  f"{r['compile_s']:.1f}" if "compile_s" in r else "-", r["note"] or ""]
        print("| " + " | ".join(cells) + " |")


def print_profiles(run: Run):
    for r in run.rows:
        if "profile_note" in r:
            print(f"\nprofile of {r['name']}: none ({r['profile_note']})")
        if "profile_top" not in r:
            continue
        print(f"\nprofile of {r['name']}: {r['profile_ms']:,.2f} ms of ops per step (the step: "
              f"{1e3 * r['step_s']:,.2f} ms), {pct(r['profile_matmul_ms'] / r['profile_ms'])} "
              f"in matrix products; the slowest:")
        for op in r["profile_top"]:
            print(f"  {op['ms']:9.3f} ms {pct(op['ms'] / r['profile_ms']):>6} "
                  f"{'matmul' if op['matmul'] else '      '} {op['op']}")
