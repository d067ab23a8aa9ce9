"""When a run stops before its last step: a preemption notice that every process agrees on, and
early stopping on the validation metrics.

Preemption. One process's SIGTERM must stop every process at the same step, or the others wait
for it forever in the next collective. With one process, a Python handler sets a flag that the
loop reads after each step. With several (`jax.distributed`), JAX's coordination service
catches SIGTERM on any of them and `reached_preemption_sync_point(step)` is True on all of them
at the same step, a few steps later; the loop asks it once a step, a host-side call that does
not wait for the devices (3.6 us, `benchmarks/preemption.py`). A Python SIGTERM handler would
take the signal from the service, so none is installed then. JAX reaches one sync point per
process: a sweep stops after the point that reached it.

Early stopping. `config.early_stopping.patience` = P > 0 ends the run after P evaluations in a
row without a better validation loss; `config.early_stopping.target` = `"metric>=value"` (or
`<=`) ends it at the first evaluation whose validation `metric` reaches `value` (`accuracy>=0.85`,
`bleu>=20`, `perplexity<=5`). A run that ends so is finished: its last state is saved, its best
checkpoint is the one with the best validation loss, and calling it again evaluates, as for a
run that reached num_train_steps (unless the new config would not have stopped it).
"""

import re
import signal

import jax

from seqjax import config as config_lib

_TARGET = re.compile(r"^\s*(\w+)\s*(>=|<=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_preempted = False  # a sync point was reached in this process: a sweep stops after its point


class StopRequest:
    """Whether a preemption notice (SIGTERM) asks the loop to stop after `step`: on one process
    its own handler's flag, on several the coordination service's sync point, the same step on
    every process.

    Nested requests (a sweep around its runs) share the signal: the inner one starts with the
    outer one's flag and passes a signal on to it."""

    def __init__(self):
        self._requested = False
        self.previous = None
        self.shared = jax.process_count() > 1

    @property
    def requested(self) -> bool:
        return self._requested or (self.shared and _preempted)

    def __enter__(self):
        if self.shared:
            if not jax.config.jax_enable_preemption_service:
                raise ValueError("a run on several processes needs JAX's preemption service "
                                 "(jax_enable_preemption_service) so that a SIGTERM stops "
                                 "every process at the same step")
            return self
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None
        self.outer = getattr(self.previous, "__self__", None)
        if not isinstance(self.outer, StopRequest):
            self.outer = None
        self._requested = bool(self.outer and self.outer.requested)
        return self

    def after(self, step: int) -> bool:
        """Whether to stop after `step`; called once a step, with increasing steps, by every
        process."""
        global _preempted
        if self.shared and not _preempted:
            from jax.experimental import multihost_utils
            _preempted = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def _handle(self, *args):
        self._requested = True
        if self.outer is not None:
            self.outer._handle(*args)

    def __exit__(self, *_):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def check_config(config):
    """config.early_stopping (absent from configs written before it: off)."""
    settings = config.get("early_stopping") or {}
    if "patience" in settings:
        patience = config_lib.expect_type(config, "early_stopping.patience", int)
        config_lib.expect(patience >= 0, "early_stopping.patience", patience,
                          "must be >= 0 (0: off)")
    target = settings.get("target", "")
    if "target" in settings:
        config_lib.expect_type(config, "early_stopping.target", str)
    config_lib.expect(not target or _parse_target(target), "early_stopping.target", target,
                      "expected 'metric>=value' or 'metric<=value' (e.g. 'accuracy>=0.85'), "
                      "or '' (off)")


def _parse_target(target: str) -> tuple[str, str, float] | None:
    """(metric, '>=' or '<=', value) of an early-stopping target, or None if it is not one."""
    match = _TARGET.match(target)
    return match and (match.group(1), match.group(2), float(match.group(3)))


class EarlyStopping:
    """`reason(evaluations_since_best, val)`: why the run ends after this evaluation, or None."""

    def __init__(self, config):
        settings = config.get("early_stopping") or {}
        self.patience = settings.get("patience", 0)
        self.target = settings.get("target", "")
        self.metric, self.op, self.value = (self.target and _parse_target(self.target)
                                            or (None,) * 3)

    def reason(self, evaluations_since_best: int, val: dict | None) -> str | None:
        if self.patience and evaluations_since_best >= self.patience:
            return (f"{evaluations_since_best} evaluations without a better validation loss "
                    f"(early_stopping.patience={self.patience})")
        if self.metric is None or not val:
            return None
        if self.metric not in val:
            raise ValueError(f"config.early_stopping.target={self.target!r}: the validation "
                             f"reports {sorted(val)}, not {self.metric!r}")
        value = val[self.metric]
        if value >= self.value if self.op == ">=" else value <= self.value:
            return f"validation {self.metric} {value:.4g} {self.op} {self.value:g} " \
                   f"(early_stopping.target)"
        return None
