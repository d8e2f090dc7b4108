"""SIGTERM (preemption) as a flag the loop polls; installed first thing, so start-up is covered."""

from __future__ import annotations

import signal


def check_due(step: int | None, every: int) -> bool:
  """Whether the processes agree on a SIGTERM at `step` (None: now; `every` < 2: every step)."""
  return step is None or every < 2 or step % every == 0


class StopSignal:
  """Turns SIGTERM into a flag; all processes agree before stopping."""

  def __init__(self):
    self.received = False
    self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self.received = True

  def should_stop(self, step: int | None = None, every: int = 1) -> bool:
    """True once SIGTERM arrived: at once on one process; on multi-host, on every process at the
    first step `check_due` picks after any process got it (a collective, so not every step)."""
    import jax  # pylint: disable=g-import-not-at-top  # not at import: keep installing it cheap
    if jax.process_count() == 1:
      return self.received
    if not check_due(step, every):  # every process skips the same steps: they stay in lockstep
      return False
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.received))))

  def restore(self) -> None:
    """Reinstall the previous handler."""
    signal.signal(signal.SIGTERM, self._previous)
