"""Errors the command lines print as one line (exit status 2) instead of a traceback."""


class ConfigError(KeyError, ValueError):
  """A configuration value is missing, unknown or inconsistent; the message says how to fix it."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ""


class RunError(RuntimeError):
  """The run stopped on purpose (non-finite step, collapse, broken data or checkpoints); says why."""
