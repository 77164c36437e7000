"""Preemption and interruption: SIGTERM (a TPU VM's preemption notice, `kill`) and SIGINT (Ctrl-C
at a terminal) set a flag the training loop reads between steps: it finishes the step, writes a
checkpoint and exits with code 75. A second SIGINT aborts at once (exit code 130) without one.
With several processes, any one's flag stops them all at the same step."""

from __future__ import annotations

import os
import signal
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

EXIT_ABORTED = 130  # the shell's code for a process ended by Ctrl-C


class PreemptionFlag:
    """Set by SIGTERM or a first SIGINT; read between steps. A second SIGINT ends the process at
    once with code 130, saying so. With several processes, any process's flag stops all of them
    at the same step."""

    def __init__(self):
        self.raised = False
        self.signal_name: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            _say(
                "train: second Ctrl-C (SIGINT): aborting now, without a checkpoint; the run "
                "resumes from its last complete checkpoint"
            )
            os._exit(EXIT_ABORTED)
        if signum == signal.SIGINT:
            _say(
                "train: Ctrl-C (SIGINT): finishing this step and writing a checkpoint; press "
                "Ctrl-C again to abort without one"
            )
        if not self.raised:
            self.signal_name = name
        self.raised = True

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: the caller handles signals itself
                pass
        outer = self._outer()
        if outer is not None and outer.raised:  # a signal the enclosing flag caught just before
            self.raised, self.signal_name = True, outer.signal_name
        return self

    def __exit__(self, *exc):
        outer = self._outer()
        if outer is not None and self.raised and not outer.raised:  # nested: tell the outer one
            outer.raised, outer.signal_name = True, self.signal_name
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _outer(self) -> "PreemptionFlag | None":
        """The flag this one is nested in (whose handler it replaced), if any."""
        previous = self._previous.get(signal.SIGTERM)
        owner = getattr(previous, "__self__", None)
        return owner if isinstance(owner, PreemptionFlag) else None

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.raised

        flags = multihost_utils.process_allgather(np.int32(self.raised))
        return bool(np.max(flags))


def _say(message: str) -> None:
    """A line on stderr from a signal handler (os.write: no buffered stream is re-entered)."""
    try:
        sys.stdout.flush()
    except Exception:
        pass
    os.write(2, (message + "\n").encode())
