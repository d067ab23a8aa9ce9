"""Batches on the devices ahead of the steps that take them, so that the host never stalls the
devices (the training loop's feed)."""

import queue
import threading

PREFETCH = 2  # host batches built ahead of the step that takes them


class Feed:
    """The batches of steps `start` to `stop` - 1 on the devices, so that the host never
    stalls them: a background thread builds host batches (`build(step)`) up to PREFETCH steps
    ahead, and `transfer_next()`, called once a step is dispatched, puts the next batch on the
    devices while that step runs. Every device program (a transfer under pmap is one) is still
    issued by the calling thread, in the same order on every process.

    A batch is a pure function of its step, so building it ahead changes no value. An error of
    `build` or of the transfer is raised by `take()` for the step it belongs to, as building
    inline would have raised it there; `close()` stops the thread (a daemon, so that even a
    builder stuck in a call cannot keep the process alive)."""

    def __init__(self, build, put, start: int, stop: int):
        self._put, self._left = put, stop - start
        self._queue = queue.Queue(PREFETCH)
        self._closed = threading.Event()
        self._next = None  # (device batch, error) of the next step, once transferred
        self._thread = threading.Thread(target=self._build, args=(build, start, stop),
                                        name="seqjax-batches", daemon=True)
        self._thread.start()

    def _build(self, build, start, stop):
        for step in range(start, stop):
            try:
                item = (build(step), None)
            except BaseException as e:  # handed to the loop, which raises it
                item = (None, e)
            self._queue.put(item)  # close() empties the queue, so this returns
            if item[1] is not None or self._closed.is_set():
                return

    def transfer_next(self):
        if self._next is not None or not self._left:
            return
        self._left -= 1
        batch, error = self._queue.get()
        if error is None:
            try:
                batch = self._put(batch)
            except Exception as e:
                error = e
        self._next = (batch, error)

    def take(self):
        """The next step's batch on the devices."""
        self.transfer_next()
        (batch, error), self._next = self._next, None
        if error is not None:
            raise error
        return batch

    def close(self):
        self._closed.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)
