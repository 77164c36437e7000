"""Preemption: SIGTERM (a TPU VM's preemption notice) sets a flag the training loop reads
between steps; with several processes, any one's flag stops them all at the same step."""
from __future__ import annotations

import signal

import jax
import numpy as np


class PreemptionFlag:
    """Set by SIGTERM (the TPU VM preemption notice, `kill`, Kubernetes); read between steps.
    With several processes, any process's flag stops all of them at the same step."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.raised = True
        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:           # not the main thread: the caller handles signals itself
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.raised
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self.raised))
        return bool(np.max(flags))
