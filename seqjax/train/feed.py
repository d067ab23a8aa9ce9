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
    builder stuck in a call cannot keep the process alive).

    A streamed corpus (`build.iterate(start)`: a grain iterator that reads ahead itself) is
    read through its iterator instead, and `state` is its position after the last batch taken
    and the fingerprint of the rows (`build.fingerprint`), which a checkpoint of that step
    saves; `resume_state` puts the iterator back at its saved position, and a fingerprint of
    other rows (shards prepared again) is refused."""

    def __init__(self, build, put, start: int, stop: int, resume_state: dict | None = None):
        self._put, self._left = put, stop - start
        self._queue = queue.Queue(PREFETCH)
        self._closed = threading.Event()
        self._next = None  # (device batch, stream state, error) of the next step, transferred
        self.state = resume_state
        if hasattr(build, "iterate"):
            self._iterator = build.iterate(start)
            fingerprint = build.fingerprint
            if resume_state is not None:
                if resume_state.get("source") != fingerprint:
                    self._iterator.close()
                    raise ValueError(f"the checkpoint of step {start} was trained on other rows "
                                     f"than the stream holds now (prepared again?)")
                self._iterator.set_state(resume_state["position"])
            source = lambda step: (next(self._iterator),
                                   dict(position=self._iterator.get_state(), source=fingerprint))
        else:
            self._iterator = None
            source = lambda step: (build(step), None)
        self._thread = threading.Thread(target=self._build, args=(source, start, stop),
                                        name="seqjax-batches", daemon=True)
        self._thread.start()

    def _build(self, source, start, stop):
        for step in range(start, stop):
            try:
                item = (*source(step), None)
            except BaseException as e:  # handed to the loop, which raises it
                item = (None, None, e)
            self._queue.put(item)  # close() empties the queue, so this returns
            if item[2] is not None or self._closed.is_set():
                return

    def transfer_next(self):
        if self._next is not None or not self._left:
            return
        self._left -= 1
        batch, state, error = self._queue.get()
        if error is None:
            try:
                batch = self._put(batch)
            except Exception as e:
                error = e
        self._next = (batch, state, error)

    def take(self):
        """The next step's batch on the devices."""
        self.transfer_next()
        (batch, state, error), self._next = self._next, None
        if error is not None:
            raise error
        self.state = state
        return batch

    def close(self):
        self._closed.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)
        if self._iterator is not None and not self._thread.is_alive():
            self._iterator.close()
