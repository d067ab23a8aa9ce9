"""One run per workdir: a lock file `workdir/.lock` naming the process that holds it.

A second run on the same workdir is refused with the holder's pid and host. A lock left by a
run that died (SIGKILL, a crash of the machine) is stale: on the same host a dead pid shows it
and the lock is taken over; from another host it cannot be checked, and the error says which
file to delete. With several processes the lock belongs to the run: process 0 takes it and
tells the others whether it could. (Two runs that find the same stale lock in the same
instant may both take it over: the window is between reading the lock and replacing it.)

A workdir in a bucket has the same lock, an object: Google Cloud Storage creates it only if no
object has its name (as O_EXCL does a file), other object stores may only check first (two runs
starting in the same instant could both take the lock). Liveness is judged the same way, so a
run restarted on another machine (a preempted VM replaced) finds its old lock held by a pid it
cannot check, and must be told to delete it.
"""

import json
import os
import socket
import time

import jax

from seqjax import files

LOCK_FILE = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir's lock (the workdir must exist)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.held = False

    def __enter__(self):
        error = None
        if jax.process_index() == 0:
            try:
                error = self._acquire()
            except OSError as e:  # a read-only file system, say: the others must hear of it
                error = f"cannot take the lock {self.path}: {e}"
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            failed = multihost_utils.broadcast_one_to_all(int(error is not None))
            if failed and error is None:
                error = f"{os.path.dirname(self.path)} is in use by another run (see process 0)"
        if error:
            raise ValueError(error)
        return self

    def _acquire(self) -> str | None:
        """Takes the lock; returns why it could not, or None."""
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            if not files.create_new(self.path, json.dumps(me)):
                holder = self._holder()
                if holder == {}:  # released meanwhile
                    continue
                if holder is None:
                    return (f"{self.path} is not a lock this code wrote; if no run is using "
                            f"{os.path.dirname(self.path)}, delete it")
                if holder["host"] == me["host"] and not _alive(holder["pid"]):
                    print(f"removed the stale lock of a run that is no longer running "
                          f"(pid {holder['pid']}, since {holder.get('since')}): {self.path}",
                          flush=True)
                    files.remove(self.path)
                    continue
                return (f"{os.path.dirname(self.path)} is in use by another run (pid "
                        f"{holder.get('pid')} on {holder.get('host')}, since "
                        f"{holder.get('since')}); wait for it to end, or if no run is using "
                        f"this workdir, delete {self.path}")
            self.held = True
            return None
        return f"could not take the lock {self.path}"

    def _holder(self) -> dict | None:
        """The lock's holder; None if the file stays unreadable for a second (a holder writes
        it at once after creating it)."""
        for _ in range(5):
            try:
                holder = json.loads(files.read_text(self.path))
                if isinstance(holder, dict) and isinstance(holder.get("pid"), int) \
                        and isinstance(holder.get("host"), str):
                    return holder
            except FileNotFoundError:
                return {}
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        return None

    def __exit__(self, *_):
        if self.held:
            self.held = False
            files.remove(self.path)
