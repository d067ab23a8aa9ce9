"""The per-step cost of the preemption agreement (seqjax.train.stopping.StopRequest on several
processes): two processes on 127.0.0.1 (gloo CPU collectives, 2 devices each) time
`reached_preemption_sync_point` against the smallest step a multi-process run has, one pmapped
all-reduce across both processes (a lower bound of any real train step).

    python benchmarks/preemption.py [--steps 2000]
"""

import argparse
import os
import socket
import subprocess
import sys
import time


def worker(process_id: int, address: str, steps: int):
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, 2, process_id)
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    step = jax.pmap(lambda x: jax.lax.psum(x, "i"), axis_name="i")
    x = jnp.ones((jax.local_device_count(), 1024))
    step(x).block_until_ready()
    check_s = step_s = 0.0
    for i in range(steps):
        t0 = time.perf_counter()
        step(x).block_until_ready()
        t1 = time.perf_counter()
        multihost_utils.reached_preemption_sync_point(i)
        t2 = time.perf_counter()
        step_s, check_s = step_s + t1 - t0, check_s + t2 - t1
    if process_id == 0:
        print(f"{steps} steps: agreement check {1e6 * check_s / steps:.1f} us/step, "
              f"all-reduce step {1e6 * step_s / steps:.1f} us/step, "
              f"ratio {check_s / step_s:.4f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--process_id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--address", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.process_id is not None:
        return worker(args.process_id, args.address, args.steps)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [subprocess.Popen([sys.executable, __file__, "--steps", str(args.steps),
                               "--process_id", str(i), "--address", address],
                              stderr=subprocess.DEVNULL) for i in range(2)]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
