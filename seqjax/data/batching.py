"""Minibatches of the rows of in-memory arrays, as a pure function of the step."""

import copy
import numbers

import numpy as np

from seqjax.data.text import check_sharding


class RowBatches:
    """Training minibatches of a dict of equal-length arrays: epoch step // steps_per_epoch
    shuffles the rows with `default_rng((seed, epoch))`, and minibatch k takes rows
    [kB, (k+1)B) of that order (the last partial minibatch of an epoch is left out). With
    `num_shards` > 1 a host gets its `batch_size / num_shards` rows of the global minibatch;
    `transform` makes the model's batch of them (translation's teacher forcing)."""

    def __init__(self, arrays: dict, batch_size: int, *, seed: int = 0, shard_index: int = 0,
                 num_shards: int = 1, what: str = "rows", transform=None):
        check_sharding(batch_size, seed, shard_index, num_shards)
        self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
        lengths = {len(a) for a in self.arrays.values()}
        if len(lengths) != 1:
            raise ValueError(
                f"arrays of different lengths: { {k: len(a) for k, a in self.arrays.items()} }")
        self.num_rows = lengths.pop()
        if self.num_rows < batch_size:
            raise ValueError(f"{self.num_rows} training {what} are too few for one minibatch of "
                             f"batch_size={batch_size}")
        self.batch_size, self.seed = batch_size, seed
        local = batch_size // num_shards
        self.rows = np.arange(shard_index * local, (shard_index + 1) * local)
        self.steps_per_epoch = self.num_rows // batch_size
        self._order = (None, None)
        self.transform = transform or (lambda rows: rows)

    def with_arrays(self, arrays: dict) -> "RowBatches":
        """The same minibatches (rows, order, shard) of other arrays of the same rows."""
        other = copy.copy(self)
        other.arrays = {name: np.asarray(a) for name, a in arrays.items()}
        if {len(a) for a in other.arrays.values()} != {self.num_rows}:
            raise ValueError(f"with_arrays: {self.num_rows} rows expected, got "
                             f"{ {k: len(a) for k, a in other.arrays.items()} }")
        return other

    def __call__(self, step: int) -> dict:
        if not (isinstance(step, numbers.Integral) and step >= 0):
            raise ValueError(f"step={step!r}: must be an integer >= 0")
        epoch, k = divmod(int(step), self.steps_per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng((self.seed, epoch)).permutation(
                self.num_rows))
        idx = self._order[1][k * self.batch_size + self.rows]
        return self.transform({name: a[idx] for name, a in self.arrays.items()})


def padded_batches(arrays: dict, batch_size: int, what: str = "rows") -> list[dict]:
    """Every row once, in order, in minibatches of `batch_size`; the last one is filled with
    copies of its first row, and `row_weight` [B] (1 for real rows, 0 for filler) tells them
    apart."""
    arrays = {name: np.asarray(a) for name, a in arrays.items()}
    n = len(next(iter(arrays.values())))
    if n == 0:
        raise ValueError(f"no {what} to evaluate")
    batches = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        real = idx < n
        batch = {name: a[np.where(real, idx, start)] for name, a in arrays.items()}
        batch["row_weight"] = real.astype(np.float32)
        batches.append(batch)
    return batches
