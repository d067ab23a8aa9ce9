"""How the per-device step runs over the local devices: `jax.pmap` (the default), or `jax.jit`
of `jax.shard_map` over a one-axis mesh named `batch` (`config.parallel='shard_map'`).

Both run the same per-device function with the same named-axis collectives, so they give the
same parameters. The engine talks to them through one interface: host state in, the state to
save out, batches in, per-device functions compiled, replicated outputs read back.

A checkpoint holds the state without a device axis, its `carry` as the rows of the global batch,
so that it does not depend on the number of processes or devices: host state is a dict of NumPy
arrays of that layout (as a checkpoint is read back), and `to_saved` gives the same layout as
global arrays that stay on the devices (as a checkpoint is written).
"""

import json

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from seqjax import config as config_lib
from seqjax.train.step import AXIS, TrainState

KINDS = ("pmap", "shard_map")


def local_devices(config) -> list:
    """The devices this process trains on: `config.num_devices` of them (0: all)."""
    local = jax.local_devices()
    if jax.process_count() > 1:
        config_lib.expect(config.num_devices == 0, "num_devices", config.num_devices,
                          "with several processes every process uses all its local devices (0)")
    config_lib.expect(0 <= config.num_devices <= len(local), "num_devices", config.num_devices,
                      f"this host has {len(local)} devices (0 uses all)")
    return local[:config.num_devices or len(local)]


def check_divisible(name: str, batch_size: int, devices):
    shards = len(devices) * jax.process_count()
    if batch_size % shards:
        raise ValueError(
            f"{name}={batch_size} does not split evenly over {shards} devices "
            f"({jax.process_count()} processes x {len(devices)} local devices); "
            f"use a multiple of {shards} or set config.num_devices")


def process_zero_texts(texts: dict[str, str]) -> dict[str, str]:
    """Process 0's `texts` (name -> text) on every process (a collective: every process calls
    it at the same point)."""
    data = np.frombuffer(json.dumps(texts, sort_keys=True).encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    if jax.process_index() != 0:
        data = np.zeros(size, np.uint8)
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(data)).tobytes())


def make(kind: str, devices):
    if kind not in KINDS:
        raise ValueError(f"config.parallel={kind!r}: expected one of {KINDS}")
    return Pmap(devices) if kind == "pmap" else ShardMap(devices)


def _split(x, n: int):
    """[B, ...] -> [n, B/n, ...]; a scalar is given to every device."""
    x = np.asarray(x)
    return np.broadcast_to(x, (n,)) if x.ndim == 0 else x.reshape(n, -1, *x.shape[1:])


class Pmap:
    """Replicated values carry a leading device axis; batches are split into [n, B/n, ...]."""

    def __init__(self, devices):
        self.n = len(devices)
        # With several processes pmap spans every device of every process (devices=None).
        self.devices = devices if jax.process_count() == 1 else None
        # pmap would copy NumPy inputs at every call; `place` puts them on the devices once.
        self._place = jax.pmap(lambda x: x, axis_name=AXIS, devices=self.devices)
        self._saveable = {}  # mesh -> compiled function

    def compile(self, fn, in_specs, out_specs, *, donate: bool = False):
        """`fn` per device over the leading device axis of every input and output (the specs
        are shard_map's, not needed here)."""
        del in_specs, out_specs
        return jax.pmap(fn, axis_name=AXIS, devices=self.devices,
                        donate_argnums=(0,) if donate else ())

    def replicate(self, tree):
        return self._put(jax.tree.map(lambda x: np.broadcast_to(x, (self.n, *np.shape(x))), tree))

    def batch(self, tree):
        return self._put(jax.tree.map(lambda x: _split(x, self.n), tree))

    def _put(self, tree):
        return self._place(tree) if jax.tree.leaves(tree) else tree

    # Outputs are global arrays over every process's devices: read only this process's shards
    # (an operation on the whole array would be a program every process must run).
    def unreplicate(self, tree):
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)

    def saveable(self, replicated, split):
        """`replicated` ([devices, ...] copies) and `split` ([devices, B/devices, ...]) as global
        arrays without the device axis: replicated, and [B, ...] split over the devices (of
        every process, in the order of their rows), with no transfer between devices or to the
        host. With one process the replicated part is device 0's copy only (one extra copy of
        the state, on that device, until orbax has copied it to the host); with several, every
        device slices its own shard."""
        if jax.process_count() == 1:
            return (jax.tree.map(lambda x: x.addressable_data(0)[0], replicated),
                    self._saveable_split(split))
        # With several processes pmap's outputs are this process's devices' part only.
        mesh = _process_major_mesh().local_mesh
        if mesh not in self._saveable:
            drop = lambda tree: jax.tree.map(lambda x: x[0], tree)
            self._saveable[mesh] = jax.jit(jax.shard_map(
                lambda r, s: (drop(r), drop(s)), mesh=mesh, in_specs=(P(AXIS), P(AXIS)),
                out_specs=(P(), P(AXIS)), check_vma=False))
        replicated, split = self._saveable[mesh](replicated, split)
        from jax.experimental import multihost_utils
        to_global = lambda tree, spec: multihost_utils.host_local_array_to_global_array(
            tree, _process_major_mesh(), spec)
        return to_global(replicated, P()), to_global(split, P(AXIS))

    def _saveable_split(self, split):
        """[devices, B/devices, ...] -> [B, ...] split over the same devices (one process)."""
        leaves = jax.tree.leaves(split)
        if not leaves:
            return split
        mesh = _mesh_of(leaves[0])
        if mesh not in self._saveable:
            self._saveable[mesh] = jax.jit(jax.shard_map(
                lambda s: jax.tree.map(lambda x: x[0], s), mesh=mesh, in_specs=P(AXIS),
                out_specs=P(AXIS), check_vma=False))
        return self._saveable[mesh](split)


class ShardMap:
    """Replicated values are global arrays replicated over the mesh, batches global arrays
    split along their first axis, and a function runs as `jit(shard_map(...))`."""

    def __init__(self, devices):
        self.devices = devices if jax.process_count() == 1 else jax.devices()
        self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
        self._replicated = NamedSharding(self.mesh, P())
        self._split = NamedSharding(self.mesh, P(AXIS))

    def compile(self, fn, in_specs, out_specs, *, donate: bool = False):
        """`fn` per device, with `shard_map`'s in/out specs (pytree prefixes of P() and
        P('batch')); an in-spec `BATCH` splits an argument's arrays and replicates its scalars."""
        compiled = {}

        def run(*args):
            key = jax.tree.structure(args), tuple(np.ndim(x) for x in jax.tree.leaves(args))
            if key not in compiled:
                specs = tuple(_batch_specs(arg) if spec is BATCH else spec
                              for spec, arg in zip(in_specs, args))
                # check_vma=False: custom VJPs (the recurrent cells' fused weight gradient)
                # return plain arrays, which the varying-axes type check would reject.
                compiled[key] = jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=specs,
                                                      out_specs=out_specs, check_vma=False),
                                        donate_argnums=(0,) if donate else ())
            return compiled[key](*args)

        return run

    def replicate(self, tree):
        return jax.tree.map(lambda x: jax.make_array_from_callback(
            np.shape(x), self._replicated, lambda index: np.asarray(x)[index]), tree)

    def batch(self, tree):
        def put(x):
            x = np.asarray(x)
            if x.ndim == 0:
                return jax.make_array_from_callback((), self._replicated, lambda index: x)
            return jax.make_array_from_process_local_data(self._split, x)
        return jax.tree.map(put, tree)

    def unreplicate(self, tree):
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)

    def saveable(self, replicated, split):
        """The state's own arrays: replicated, and [B, ...] split over the mesh already."""
        return replicated, split


def _process_major_mesh() -> Mesh:
    """Every process's devices, process 0's first: process p's devices hold rows
    [p, p + 1) * B / P of a global batch, as `local_rows` gives them to it."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (AXIS,))


def _mesh_of(x) -> Mesh:
    """The one-axis mesh whose i-th device holds x[i], for x split along its first axis (a
    pmap output, over every process's devices)."""
    index = x.sharding.devices_indices_map(x.shape)
    first = lambda d: index[d][0] if isinstance(index[d][0], int) else index[d][0].start or 0
    return Mesh(np.asarray(sorted(index, key=first)), (AXIS,))


BATCH = object()  # an in-spec: split the arrays of this argument, replicate its scalars


def _batch_specs(tree):
    return jax.tree.map(lambda x: P(AXIS) if np.ndim(x) else P(), tree)


# ---------------------------------------------------------------------------------------------
# Host state <-> devices, through either backend.
# ---------------------------------------------------------------------------------------------

def local_rows(tree):
    """This process's rows of global-batch arrays (scalars as they are): with P processes,
    process p holds rows [p, p + 1) * B / P, as every task's data source shards them."""
    n, p = jax.process_count(), jax.process_index()
    return jax.tree.map(lambda x: x if np.ndim(x) == 0 else
                        np.asarray(x)[p * (len(x) // n):(p + 1) * (len(x) // n)], tree)


def to_devices(host: dict, par) -> TrainState:
    """Host state -> devices."""
    replicated = par.replicate({k: host[k] for k in ("step", "params", "opt_state", "rng")})
    return TrainState(**replicated, carry=par.batch(local_rows(host["carry"])))


def to_saved(state: TrainState, par) -> dict:
    """The state as a checkpoint holds it (the layout of host state), as global arrays on the
    devices, for orbax to copy and write (`Checkpoints.save`): nothing is copied to the host
    here. With shard_map these are the state's own buffers."""
    replicated, carry = par.saveable(dict(step=state.step, params=state.params,
                                          opt_state=state.opt_state, rng=state.rng),
                                     state.carry)
    return dict(replicated, carry=carry)
