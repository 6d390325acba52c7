"""SIGTERM / SIGINT as a request to stop at the next step boundary, not as sudden death.

Cluster schedulers send SIGTERM some seconds before they kill a job, and a user stops a run with
Ctrl-C (SIGINT). Inside ``StopRequest`` both only record the signal; the training loop asks
``requested(step)`` between steps, writes a checkpoint and raises ``errors.Preempted``. A second
signal while the first is pending acts at once (the handler that was installed before). A
signal the process was started to ignore (SIGINT of a background job, nohup) stays ignored.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Context manager recording SIGTERM / SIGINT; several hosts agree on the step to stop at."""

  def __init__(self, sync_every: int = 1):
    self.signum: int | None = None
    self.sync_every = max(1, int(sync_every))
    self._previous: dict[int, object] = {}

  def _handle(self, signum, frame):
    if self.signum is not None:  # asked twice: stop now, as without this handler
      previous = self._previous.get(signum)
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
      if callable(previous):
        previous(signum, frame)
      else:
        signal.raise_signal(signum)
      return
    self.signum = signum

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is threading.main_thread():  # only there can Python catch them
      for s in SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:  # ignored on purpose (nohup, background jobs)
          self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous.clear()

  def requested(self, step: int) -> bool:
    """Whether to stop before ``step``: this process's flag, or on several hosts (every
    ``sync_every`` steps, so that all of them stop at the same step) any process's flag."""
    if jax.process_count() == 1:
      return self.signum is not None
    if step % self.sync_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
    first = int(np.max(flags))
    if first and self.signum is None:
      self.signum = first
    return bool(first)

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ''
