"""SIGTERM (preemption) as a flag the loop polls; installed first thing so start-up is covered too."""

from __future__ import annotations

import signal


class StopSignal:
  """Turns SIGTERM into a flag; all processes agree before stopping."""

  def __init__(self):
    self.received = False
    self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self.received = True

  def should_stop(self) -> bool:
    """True on every process once any process got SIGTERM (a collective on multi-host)."""
    import jax  # pylint: disable=g-import-not-at-top  # not at import: keep installing it cheap
    if jax.process_count() == 1:
      return self.received
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.received))))

  def restore(self) -> None:
    """Reinstall the previous handler."""
    signal.signal(signal.SIGTERM, self._previous)
