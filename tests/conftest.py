"""Four CPU devices so pmap paths run on a laptop, and a persistent compilation cache shared by
the tests (and their subprocesses), which roughly halves the time to a first step."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "seqjax-test-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# A size limit turns on the cache's file lock around every read and write: without it a test
# process can read an entry another process (a worker, one of two hosts) is still writing,
# and XLA crashes on the truncated executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))

import jax  # noqa: E402  (after the environment above)

assert jax.local_device_count() == 4, "XLA_FLAGS was set after jax initialised its backend"

import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from seqjax.config import load_experiment  # noqa: E402
from seqjax.train.metrics import METRICS_FILE  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
    """`get_config(arg)` of experiments/<name>.py, as launch.py would load it."""
    return load_experiment(str(ROOT / "experiments" / f"{name}.py")).get_config(arg)


@pytest.fixture
def tiny_charlm():
    return load_config("charlm", "tiny")


def launch(*args, timeout=120) -> subprocess.CompletedProcess:
    """`python launch.py *args` in a subprocess, its output captured."""
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def restored(workdir, which: str = "latest") -> dict:
    """The host state (params, opt_state, step, rng, carry) of a run's newest `which` checkpoint."""
    from seqjax.train.checkpoint import Checkpoints
    ckpts = Checkpoints(str(workdir))
    state, _ = ckpts.restore(which=which)
    ckpts.close()
    return state


def logged(workdir, split: str = "train") -> list[dict]:
    """The records of one split of a run's metrics.jsonl; strict: a malformed line fails."""
    with open(pathlib.Path(workdir) / METRICS_FILE) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]
