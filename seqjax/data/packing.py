"""Sequence packing: several short sequences share one row, so that a batch of fixed shape holds
fewer padding tokens. Pure NumPy and deterministic: the rows are a function of the lengths.

A packed row holds its sequences one after another, then padding. Beside the tokens it has
segment ids (0 at padding, 1..k for the row's k sequences in the order of their indices) and
positions that restart at 0 with each sequence, so that a model can keep the sequences apart
(attention within a segment only: `seqjax.nn.attention.segment_mask`) and give each token the
position it has unpacked.

`first_fit` chooses the rows by first-fit decreasing (Johnson 1973): sequences are taken
longest first (ties in index order), and each goes into the lowest-numbered row where it fits,
else into a new row: the short sequences that come last fill the gaps the long ones left.

A sequence may have parts that go to rows of their own under one segment number: a translation
pair's source and target go to source row r and target row r, so `lengths` is [N, K] with a
`capacity` per part, and a sequence fits a row when each of its parts does.

`align` starts every sequence at a multiple of it (its span is its length rounded up, at most
the row): block-local attention's blocks (`seqjax.nn.local_attention`) are fixed positions of
the row, so a sequence packed at a multiple of the block size sees the same windows of its own
tokens as it does alone.

Dimension letters: N sequences, K parts of a sequence, T unpacked length, R rows, L row length,
M sequences a row (at most).
"""

import heapq
import numbers

import numpy as np

_NO_ROW = np.iinfo(np.int64).max


def _check_int(name: str, value, low: int):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


def spans(lengths, capacity, align: int = 1) -> np.ndarray:
    """The room a sequence takes in a row: its length rounded up to a multiple of `align`, at
    most `capacity` (which a sequence of that span fills alone)."""
    return np.minimum(-(-np.asarray(lengths) // align) * align, capacity)


def first_fit(lengths, capacity, max_per_row: int | None = None, align: int = 1) -> np.ndarray:
    """The row [N] (int64; rows numbered from 0 in the order they are opened) of each sequence
    of `lengths` ([N], or [N, K] for sequences of K parts), packed first-fit decreasing (by
    `spans`) into rows of `capacity` tokens (one int, or K: one per part), with at most
    `max_per_row` sequences a row when it is given. Every length must be in [1, capacity]."""
    lengths_NxK = np.asarray(lengths)
    if lengths_NxK.ndim == 1:
        lengths_NxK = lengths_NxK[:, None]
    if lengths_NxK.ndim != 2 or not np.issubdtype(lengths_NxK.dtype, np.integer):
        raise ValueError(f"lengths must be integers of shape [N] or [N, K], got "
                         f"{lengths_NxK.dtype} {lengths_NxK.shape}")
    N, K = lengths_NxK.shape
    capacity_K = np.broadcast_to(np.asarray(capacity), (K,))
    for c in capacity_K:
        _check_int("capacity", c.item(), 1)
    if max_per_row is not None:
        _check_int("max_per_row", max_per_row, 1)
    _check_int("align", align, 1)
    bad = np.flatnonzero(((lengths_NxK < 1) | (lengths_NxK > capacity_K)).any(1))
    if len(bad):
        raise ValueError(f"sequence {bad[0]} has lengths {lengths_NxK[bad[0]].tolist()}: each "
                         f"must be in [1, capacity={capacity_K.tolist()}]")
    spans_NxK = spans(lengths_NxK, capacity_K, align)

    # The open rows by state (the room left in each part, and the sequences held when they are
    # capped): a heap of row numbers per state, and in `lowest` the smallest of each, so that
    # the first row with room for a sequence is the minimum of `lowest` over the states that
    # have room for it.
    held_states = max_per_row or 1
    lowest = np.full((*(capacity_K + 1), held_states), _NO_ROW, np.int64)
    heaps: dict[tuple, list[int]] = {}
    row_N = np.empty(N, np.int64)
    num_rows = 0
    for n in np.argsort(-spans_NxK.sum(1), kind="stable"):
        need = spans_NxK[n]
        room = lowest[tuple(slice(x, None) for x in need)]
        flat = int(room.argmin())
        if room.flat[flat] == _NO_ROW:
            row, left, held = num_rows, capacity_K, 0
            num_rows += 1
        else:
            state = tuple(np.add(np.unravel_index(flat, room.shape), np.append(need, 0)).tolist())
            row = heapq.heappop(heaps[state])
            lowest[state] = heaps[state][0] if heaps[state] else _NO_ROW
            left, held = np.asarray(state[:K]), state[K]
        row_N[n] = row
        left, held = left - need, held + 1
        if left.min() > 0 and (max_per_row is None or held < max_per_row):
            state = (*(int(x) for x in left), held if max_per_row else 0)
            heapq.heappush(heaps.setdefault(state, []), row)
            lowest[state] = min(lowest[state], row)
    return row_N


class Packing:
    """Where sequences of `lengths_N` go in packed rows of `length` tokens, given their rows
    (`first_fit` with the same `align`): each row's sequences one after another in index
    order, each starting where the span of the one before ends. `segment_N` (1..k) and
    `offset_N` (the sequence's first position in its row) say where each one is."""

    def __init__(self, row_N, lengths_N, length: int, align: int = 1):
        row_N, lengths_N = np.asarray(row_N, np.int64), np.asarray(lengths_N, np.int64)
        if row_N.shape != lengths_N.shape or row_N.ndim != 1:
            raise ValueError(f"rows {row_N.shape} and lengths {lengths_N.shape} must be [N]")
        N = len(row_N)
        self.row_N, self.length = row_N, length
        self.num_rows = int(row_N.max()) + 1 if N else 0
        order = np.argsort(row_N, kind="stable")  # by row, then by index
        in_order = row_N[order]
        first = np.searchsorted(in_order, in_order)  # where each one's row starts in `order`
        spans_N = spans(lengths_N[order], length, align)
        starts = np.cumsum(spans_N) - spans_N
        self.segment_N, self.offset_N = np.empty(N, np.int64), np.empty(N, np.int64)
        self.segment_N[order] = np.arange(N) - first + 1
        self.offset_N[order] = starts - starts[first]
        ends_N = self.offset_N + lengths_N
        if N and ends_N.max() > length:
            raise ValueError(f"the sequences given row {row_N[np.argmax(ends_N)]} hold more "
                             f"than {length} tokens")
        # One entry per packed token: its sequence, its position there, its row and column.
        self._sequence = np.repeat(np.arange(N), lengths_N)
        self._position = np.arange(len(self._sequence)) - np.repeat(
            np.cumsum(lengths_N) - lengths_N, lengths_N)
        self._row = row_N[self._sequence]
        self._column = self.offset_N[self._sequence] + self._position

    def _scatter(self, values, fill) -> np.ndarray:
        out = np.full((self.num_rows, self.length), fill, np.asarray(values).dtype)
        out[self._row, self._column] = values
        return out

    def tokens(self, values_NxT, fill=0) -> np.ndarray:
        """[R, L]: the first lengths[n] entries of each row n of `values_NxT`, packed; `fill`
        at padding."""
        return self._scatter(np.asarray(values_NxT)[self._sequence, self._position], fill)

    def segment_ids(self) -> np.ndarray:
        """[R, L] int32: 1..k for the row's sequences, 0 at padding."""
        return self._scatter(self.segment_N[self._sequence].astype(np.int32), 0)

    def positions(self) -> np.ndarray:
        """[R, L] int32: each token's position in its own sequence (0 at padding)."""
        return self._scatter(self._position.astype(np.int32), 0)

    def per_sequence(self, values_N, max_per_row: int, fill=0) -> np.ndarray:
        """[R, M]: the value of each row's sequence s at column s - 1, `fill` after the last."""
        values_N = np.asarray(values_N)
        if len(values_N) and self.segment_N.max() > max_per_row:
            raise ValueError(f"a row holds {self.segment_N.max()} sequences: more than "
                             f"max_per_row={max_per_row}")
        out = np.full((self.num_rows, max_per_row), fill, values_N.dtype)
        out[self.row_N, self.segment_N - 1] = values_N
        return out
