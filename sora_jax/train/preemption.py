"""Preemption: turn SIGTERM (or the TPU/GKE preemption notice) into "save at the next step boundary, exit 0".

One process: a SIGTERM handler sets a flag that the loop polls after every step. Several processes
(``jax.distributed``): JAX's preemption sync manager owns the notice (it listens for SIGTERM and the
coordination service spreads it), and ``multihost_utils.reached_preemption_sync_point(step)`` turns true on
every process at the same step, so all save the same step and stop together.
"""

from __future__ import annotations

import signal
import threading

import jax


class PreemptionWatch:
    """``reached(step)``: True once a preemption notice has arrived (the same step on every process).

    Use as a context manager; the previous SIGTERM handler is restored on exit.
    """

    def __init__(self) -> None:
        self.notice = threading.Event()
        self._previous = None

    def __enter__(self) -> PreemptionWatch:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        self.notice.set()

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.notice.is_set()
